"""kill -9 of the long commands (`merge`, `edit --out`, `bench`, `vector train`) on tiny models.

Each command runs as the real CLI in a subprocess and is killed (SIGKILL: no cleanup runs) at named dangerous
moments (`PERSONAEDIT_FAULT_AT`, see personaedit/faults.py), at seeded random points among its steps, and at a
seeded random wall-clock moment. After every kill the target is absent or whole and loadable; after the rerun
no temporary is left, and the result equals an uninterrupted run's (byte for byte where the method is
deterministic, which on CPU all four are). About 1.5-2.5 minutes on 2 cores, mostly process start-up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from personaedit.edits import load_edit
from personaedit.fileio import atomic_dir, atomic_path, remove_stale_temporaries
from personaedit.vectors.folder import checkpoint_complete
from test_loading import save_tiny
from test_merge import make_vector, save_model

TESTS = Path(__file__).resolve().parent
SEED = 14
KILLED = -signal.SIGKILL
TEMPORARY = re.compile(r"\..+\.(tmp|old)-\d+-[0-9a-f]+")

# `bench` through the real CLI, with the quick suite cut to a few 4-token replies and the length-based fake judge
# (the real judge's encoder is too slow for a fault test; the bench code paths are the same).
BENCH_DRIVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from personaedit.bench.measure import BENCH_SUITES, BenchSuite
BENCH_SUITES["quick"] = BenchSuite(max_new_tokens=4, perplexity_texts=2, robustness_questions=2, questions_per_trait=1,
                                   neutral_questions=2)
import personaedit.eval.text_judge as text_judge
from test_suite import FakeJudge
text_judge.TextJudge.load = classmethod(lambda cls, *args, **kwargs: FakeJudge())
from personaedit.cli import main
main(sys.argv[1:])
"""


def run(root: Path, args: list[str], *, fault: str | None = None, kill_after: float | None = None,
        bench: bool = False) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of one CLI run; `fault` kills it at a named point, `kill_after` after that
    many seconds (if it is still running)."""
    env = {**os.environ, "PERSONAEDIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("PERSONAEDIT_FAULT_AT", None)
    if fault:
        env["PERSONAEDIT_FAULT_AT"] = fault
    command = [sys.executable, "-c", BENCH_DRIVER, *args] if bench else [sys.executable, "-m", "personaedit", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, err, time.perf_counter() - start


def ok(result: tuple[int, str, float]) -> float:
    code, err, seconds = result
    assert code == 0, err[-3000:]
    return seconds


def killed(result: tuple[int, str, float]) -> None:
    code, err, _ = result
    assert code == KILLED, f"the named fault point was not reached (exit {code}): {err[-3000:]}"


def temporaries(folder: Path) -> list[Path]:
    """Temporaries of atomic writes anywhere under `folder` (its own ones beside it included)."""
    found = [p for p in folder.rglob(".*") if TEMPORARY.fullmatch(p.name)]
    return found + [p for p in folder.parent.glob(f".{folder.name}.*") if TEMPORARY.fullmatch(p.name)]


def same_tensors(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes(), f"{a} differs from {b}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_tiny(root / "model")
    _, model = save_model(root / "base")
    make_vector(root / "vec-a", model, seed=1, rank=2)
    make_vector(root / "vec-b", model, seed=2)
    return root


# --- the atomic writes themselves ----------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_target_are_removed_by_its_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".out.tmp-{dead}-0a1b", tmp_path / f".out.json.tmp-{dead}-99"]
    stale[0].mkdir(mode=0o700)
    (stale[0] / "model.safetensors").write_bytes(b"\0" * 1000)
    stale[1].write_text("{")
    others = [tmp_path / f".out.tmp-{alive}-0a1b", tmp_path / f".other.tmp-{dead}-0a1b", tmp_path / ".out.tmp"]
    for path in others:
        path.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        assert TEMPORARY.fullmatch(tmp.name) and tmp.stat().st_mode & 0o777 == 0o700
        (tmp / "a").write_text("1")
    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)  # a live run's, another target's
    assert (tmp_path / "out" / "a").read_text() == "1" and (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_a_folder_of_atomic_writes_is_swept_of_every_dead_runs_temporaries(tmp_path):
    from personaedit.fileio import remove_stale_temporaries_in

    dead = _dead_pid()
    for name in (f".steer-ab12.tmp-{dead}-01", f".report.md.tmp-{dead}-02", f".prompt-cd34.tmp-{os.getpid()}-03"):
        (tmp_path / name).mkdir()
    (tmp_path / "steer-ab12").mkdir()
    assert sorted(p.name for p in remove_stale_temporaries_in(tmp_path)) == [f".report.md.tmp-{dead}-02", f".steer-ab12.tmp-{dead}-01"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".prompt-cd34.tmp-{os.getpid()}-03", "steer-ab12"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_version_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    old = tmp_path / f".out.old-{_dead_pid()}-beef"
    old.mkdir()
    (old / "edit.json").write_text("old")
    assert remove_stale_temporaries(tmp_path / "out") == []
    assert (tmp_path / "out" / "edit.json").read_text() == "old" and not old.exists()


# --- the commands, killed -----------------------------------------------------------------------

def test_merge_survives_kill_9(world):
    rng = random.Random(SEED)
    args = ["merge", "--base", str(world / "base"), "--vector", f"{world / 'vec-a'}=0.5", "--vector", f"{world / 'vec-b'}=-0.3",
            "--method", "ties", "--density", "0.5", "--max-shard-size", "100KB"]
    reference = world / "merged-ref"
    seconds = ok(run(world, [*args, "--out", str(reference)]))
    tensors = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(tensors) > 1  # several shards: a kill can fall between them
    out = world / "merged"

    def whole_or_absent():
        assert not out.exists() or sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())

    killed(run(world, [*args, "--out", str(out)], fault=f"merge.tensor:{rng.randint(1, 25)}"))
    whole_or_absent()
    leaked = temporaries(out)
    assert len(leaked) == 1 and leaked[0].stat().st_mode & 0o777 == 0o700  # what a kill leaves: the next run removes it
    killed(run(world, [*args, "--out", str(out)], fault="atomic_dir.commit:1"))
    whole_or_absent()
    assert len(temporaries(out)) == 1 and leaked[0] not in temporaries(out)
    run(world, [*args, "--out", str(out)], kill_after=rng.uniform(0.5, 1.0) * seconds)
    whole_or_absent()
    ok(run(world, [*args, "--out", str(out)]))
    assert temporaries(out) == []
    for name in tensors:
        same_tensors(out / name, reference / name)
    # killed while replacing an earlier merge: the old one is moved aside, then put back by the next run
    killed(run(world, [*args, "--out", str(out)], fault="atomic_dir.swap:1"))
    whole_or_absent()
    ok(run(world, [*args, "--out", str(out)]))
    assert temporaries(out) == []
    for name in tensors:
        same_tensors(out / name, reference / name)
    assert json.loads((out / "personaedit-merge.json").read_text()) == json.loads((reference / "personaedit-merge.json").read_text())


def test_edit_out_survives_kill_9(world):
    rng = random.Random(SEED + 1)
    args = ["edit", "steer", "--model", str(world / "model"), "--persona", "extraversion=high", "--layer", "1", "--pairs", "8"]
    reference = world / "steer-ref"
    seconds = ok(run(world, [*args, "--out", str(reference)]))
    out = world / "steer"

    def whole_or_absent():
        if out.exists():
            load_edit(out)
            same_tensors(out / "tensors.safetensors", reference / "tensors.safetensors")

    killed(run(world, [*args, "--out", str(out)], fault="atomic_dir.commit:1"))
    assert not out.exists() and len(temporaries(out)) == 1
    run(world, [*args, "--out", str(out)], kill_after=rng.uniform(0.6, 1.0) * seconds)
    whole_or_absent()
    if not out.exists():
        shutil.copytree(reference, out)  # an earlier edit there, for the next kill to fall while it is replaced
    killed(run(world, [*args, "--out", str(out), "--force"], fault="atomic_dir.swap:1"))
    whole_or_absent()
    ok(run(world, [*args, "--out", str(out), "--force"]))
    whole_or_absent()
    assert out.exists() and temporaries(out) == []


def _store_rows(folder: Path) -> dict[str, dict]:
    """Every stored cell, whole (sqlite commits a row or nothing), without the fit's time and memory."""
    with sqlite3.connect(folder / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {key: json.loads(result) for key, result in db.execute("SELECT key, result FROM cells")}
    for row in rows.values():
        row.pop("fit", None)
    return rows


def test_bench_survives_kill_9(world):
    rng = random.Random(SEED + 2)
    args = ["bench", "--model", str(world / "model"), "--methods", "prompt,steer", "--personas", "extraversion=high",
            "--strengths", "0,1", "--set", "steer.layer=1", "--set", "steer.pairs=8"]
    reference = world / "bench-ref"
    seconds = ok(run(world, [*args, "--out", str(reference)], bench=True))
    expected = _store_rows(reference)
    assert len(expected) == 2 + 2 * 2  # the base model, its reference under the persona, 2 methods x 2 strengths
    out = world / "bench"

    def consistent():
        if (out / "results.sqlite").exists():
            rows = _store_rows(out)
            assert all(rows[key] == expected[key] for key in rows)
        for folder in (out / "edits").glob("[!.]*"):
            load_edit(folder)

    killed(run(world, [*args, "--out", str(out)], fault=f"bench.cell:{rng.randint(1, 3)}", bench=True))
    consistent()
    killed(run(world, [*args, "--out", str(out)], fault="atomic_dir.commit:1", bench=True))  # saving a fitted edit
    consistent()
    assert temporaries(out / "edits")
    run(world, [*args, "--out", str(out)], kill_after=rng.uniform(0.5, 1.0) * seconds, bench=True)
    consistent()
    ok(run(world, [*args, "--out", str(out)], bench=True))
    assert _store_rows(out) == expected and temporaries(out) == []
    for folder in (reference / "edits").iterdir():
        for file in folder.iterdir():  # edit.json, and tensors.safetensors for steer
            same_tensors(out / "edits" / folder.name / file.name, file)
    assert (out / "report.md").is_file()


def test_vector_train_survives_kill_9(world):
    rng = random.Random(SEED + 3)
    # 20 questions: two distillation batches (16 + 4); 20 examples in batches of 8: 3 steps an epoch, 6 in all
    args = ["vector", "train", "--model", str(world / "model"), "--persona", "extraversion=high", "--limit", "20",
            "--max-new-tokens", "4", "--batch-size", "8", "--epochs", "2", "--save-steps", "2", "--lora-rank", "2"]
    reference = world / "vector-ref"
    seconds = ok(run(world, [*args, "--out", str(reference)]))
    out = world / "vector"

    def whole_or_absent():
        if (out / "edit.json").exists():
            load_edit(out)
            same_tensors(out / "tensors.safetensors", reference / "tensors.safetensors")

    killed(run(world, [*args, "--out", str(out)], fault="distill.batch:1"))
    assert not (out / "examples.jsonl").exists() and not (out / "edit.json").exists()
    assert len((out / "examples.partial.jsonl").read_text().splitlines()) == 2  # the settings, one batch of 16
    killed(run(world, [*args, "--out", str(out)], fault="train.checkpoint:1"))  # checkpoint-2 has weights only
    assert (out / "examples.jsonl").read_bytes() == (reference / "examples.jsonl").read_bytes()
    assert not (out / "examples.partial.jsonl").exists()
    partial = out / "checkpoints" / "checkpoint-2"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    killed(run(world, [*args, "--out", str(out)], fault=f"train.step:{rng.randint(3, 6)}"))
    whole_or_absent()
    run(world, [*args, "--out", str(out)], kill_after=rng.uniform(0.6, 1.0) * seconds)
    whole_or_absent()
    if not (out / "edit.json").exists():
        killed(run(world, [*args, "--out", str(out)], fault="atomic_dir.commit:1"))  # while the vector is saved
        assert not (out / "edit.json").exists() and temporaries(out)
    ok(run(world, [*args, "--out", str(out)]))
    whole_or_absent()
    assert (out / "edit.json").exists() and temporaries(out) == [] and not (out / ".staged-vector").exists()
    assert load_file(out / "tensors.safetensors").keys() == load_file(reference / "tensors.safetensors").keys()
    assert all(checkpoint_complete(c) for c in (out / "checkpoints").iterdir())  # incomplete ones were removed
