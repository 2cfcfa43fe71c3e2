"""`bench --backend ray` on a Ray cluster of two worker processes started here (a tiny model, the fake judge, the
quick suite cut short; see ray_cells.py): cells run in parallel and fill the one store, a cell whose worker dies is
recorded and run again, a cell that always fails is recorded at each attempt and named without losing the others;
an address with no cluster behind it is a one-line error before the model is loaded. Ray's start-up dominates
(about 10 s on 2 idle cores; minutes when other jobs load them, though the workers keep the test's priority)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from clirun import run_cli
from personaedit.bench import ResultStore, parse_personas, run_bench
from personaedit.bench.failures import FailureLog
from personaedit.bench.ray_backend import ATTEMPTS, CellsFailed, connect
from personaedit.errors import PersonaEditError
from personaedit.models import load_model
from test_loading import save_tiny
from test_suite import FakeJudge

TESTS = Path(__file__).resolve().parent
PERSONAS = parse_personas(["extraversion=high", "agreeableness=low"])


def test_cells_run_in_parallel_on_two_workers_and_failed_ones_are_retried(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'personaedit[ray]')")
    import ray_cells

    for target, name, value in ray_cells.patches():
        (monkeypatch.setitem if isinstance(target, dict) else monkeypatch.setattr)(target, name, value)
    lm = load_model(str(save_tiny(tmp_path / "model")))
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "RAY_CELLS_DIR": str(shared),
           "PERSONAEDIT_CACHE": os.environ["PERSONAEDIT_CACHE"], "OMP_NUM_THREADS": "1"}
    # Ray lowers its workers' priority (nice +15..19): on a busy shared machine they would crawl through start-up
    monkeypatch.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_cells.setup", "env_vars": env})
    try:
        address = ray.get_runtime_context().gcs_address
        with pytest.raises(CellsFailed, match=r"2 cell\(s\) failed on every one of 3 attempts.*broken") as failed:
            run_bench(lm, ["meet", "dies_once", "broken"], PERSONAS, [1.0], tmp_path / "bench", backend="ray",
                      ray_address=address, judge=FakeJudge())
    finally:
        ray.shutdown()
    assert sorted(failed.value.keys) == sorted(f"broken|{persona}|1" for persona in PERSONAS)
    assert len(list((shared / "meet").iterdir())) == 2  # the two `meet` cells ran at once, in two processes
    with ResultStore(tmp_path / "bench" / "results.sqlite") as store:
        rows = list(store.rows())
    stored = {(r["method"], r["persona"]) for r in rows if r["method"] != "base"}
    assert stored == {(method, persona) for method in ("meet", "dies_once") for persona in PERSONAS}
    with FailureLog(tmp_path / "bench" / "results.sqlite") as log:
        failures = log.rows()
    died = [f for f in failures if f["key"].startswith("dies_once")]
    assert len(died) == 1 and died[0]["attempt"] == 1 and "WorkerCrashedError" in died[0]["error"]
    broken = [f for f in failures if f["key"].startswith("broken")]
    assert sorted(f["attempt"] for f in broken) == sorted(list(range(1, ATTEMPTS + 1)) * 2)
    assert all("RuntimeError: broken on purpose" in f["error"] and "pid" in f["worker"] for f in broken)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ray_address_without_a_cluster_is_one_line_before_the_model_loads(tmp_path, capsys):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'personaedit[ray]')")
    args = ["bench", "--model", str(tmp_path / "no-such-model"), "--methods", "prompt", "--personas", "extraversion=high",
            "--out", str(tmp_path / "bench"), "--backend", "ray"]
    start = time.perf_counter()
    code, _, err = run_cli([*args, "--ray-address", f"127.0.0.1:{free_port()}"], capsys)
    assert code == 2 and err.startswith("error: no Ray cluster answers at 127.0.0.1:") and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 30
    code, _, err = run_cli([*args, "--ray-address", "head-node"], capsys)
    assert code == 2 and "give HOST:PORT" in err
    code, _, err = run_cli([*args[:-2], "--ray-address", "127.0.0.1:6379"], capsys)
    assert code == 2 and err.strip() == "error: --ray-address is for --backend ray"
    assert not (tmp_path / "bench").exists()


def test_a_process_connected_to_one_cluster_refuses_the_address_of_another(monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'personaedit[ray]')")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.0.0.2:6379"))
    for address in (None, "auto", "127.0.0.1:6379", "ray://head:10001"):
        connect(address)  # the connection in place is used
    with pytest.raises(PersonaEditError, match="already connected to the Ray cluster at 10.0.0.2:6379, not 10.0.0.3:6380"):
        connect("10.0.0.3:6380")


def test_cells_that_never_finished_still_get_a_report_then_exit_1(tmp_path, capsys, monkeypatch):
    import personaedit.bench as bench

    def some_cells_lost(lm, methods, personas, strengths, out, **kwargs):
        ResultStore(Path(out) / "results.sqlite").close()  # a store the other cells went into
        raise CellsFailed("2 cell(s) failed on every one of 3 attempts and are not stored (broken|extraversion=1|1 …)",
                          ["broken|extraversion=1|1", "broken|extraversion=1|2"])

    monkeypatch.setattr(bench, "run_bench", some_cells_lost)
    args = ["bench", "--model", str(save_tiny(tmp_path / "model")), "--methods", "prompt", "--personas",
            "extraversion=high", "--out", str(tmp_path / "bench")]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and (tmp_path / "bench" / "report.md").is_file()
    assert err.splitlines()[-1].startswith("error: 2 cell(s) failed on every one of 3 attempts")
