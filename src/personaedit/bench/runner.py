"""Run a benchmark grid: measure the base model once, fit each (method, persona) once (saved under
DIR/edits and reused), measure every strength, and store each cell as soon as it is finished; a re-run
skips finished cells. Cells run here (local) or as Ray tasks on a cluster (ray: bench/ray_backend.py); both run
a (method, persona)'s cells with bench/cell.py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from personaedit.bench.cell import run_group
from personaedit.bench.failures import FailureLog
from personaedit.bench.grid import Cell, expand_grid
from personaedit.bench.measure import base_measurement, bench_suite, judge_identity, robust_base, towards
from personaedit.bench.store import ResultStore, pin_conflict
from personaedit.errors import PersonaEditError
from personaedit.faults import fault_point
from personaedit.fileio import remove_stale_temporaries_in
from personaedit.models import LoadedModel
from personaedit.persona import Persona
from personaedit.progress import LabelledProgress

BACKENDS = ("local", "ray")
BASE = "base"


def base_key(persona: str = "") -> str:
    """Key of the base model's row ("") and of its reference row for one persona."""
    return Cell(BASE, persona, 0.0).key


def group_cells(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells that share one fitted edit (same method and persona), in grid order."""
    by_fit: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        by_fit[(cell.method, cell.persona)].append(cell)
    return list(by_fit.values())


RESULTS = "results.sqlite"


def _pinned_options(methods: Sequence[str], method_options: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Every method of the run with its fit options ({} = the method's defaults)."""
    return {m: dict((method_options or {}).get(m, {})) for m in methods}


def check_resumable(out: str | Path, methods: Sequence[str], *, suite: str = "quick",
                    method_options: dict[str, dict[str, Any]] | None = None, judge: Any = None,
                    model_fingerprint: str | None = None) -> None:
    """Refuse, before any model is loaded, a bench folder this run cannot add to: one made with another suite,
    judge (default: the shipped text judge, whose head is read but no encoder loaded), model (when
    `model_fingerprint` is given; `run_bench` checks it once the model is loaded) or other options for a method
    both runs have. Methods, personas and strengths may change. Reads only; a folder without results passes."""
    bench_suite(suite)  # an unknown suite is a one-line error too
    store = ResultStore.read_only(Path(out) / RESULTS)
    if store is None:
        return
    if judge is None:
        from personaedit.eval.text_judge import TextJudge

        judge = TextJudge.load()
    identity: dict[str, Any] = {"suite": suite, "judge": judge_identity(judge)}
    if model_fingerprint is not None:
        identity["model_fingerprint"] = model_fingerprint
    with store:
        problem = pin_conflict(store.pins(), store.methods(), identity, _pinned_options(methods, method_options))
    if problem:
        raise PersonaEditError(f"{out} {problem}; use another --out folder")


def run_bench(
    lm: LoadedModel,
    methods: list[str],
    personas: list[str],
    strengths: list[float],
    out: str | Path,
    *,
    suite: str = "quick",
    backend: str = "local",
    ray_address: str | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    judge: Any = None,
    on_progress: LabelledProgress | None = None,
) -> Path:
    """Run every missing cell of the grid into DIR/results.sqlite; returns the store's path.

    With `backend="ray"` the (method, persona) groups run as Ray tasks on the cluster at `ray_address` (else
    RAY_ADDRESS's, else a local one); a failed task is recorded in the store's failures table and run again
    (`ray_backend.ATTEMPTS` times in all), and `ray_backend.CellsFailed` names the cells that never finished,
    raised once every other cell is stored.

    `method_options` maps a method to options for its fit (e.g. {"dpnle": {"pairs": 500}}); a folder
    remembers its model, suite and judge and each method's options, and refuses to resume with others
    (`check_resumable` says so before the model is loaded); methods, personas and strengths may change."""
    from personaedit.eval.text_judge import TextJudge

    if backend not in BACKENDS:
        raise PersonaEditError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    if ray_address and backend != "ray":
        raise PersonaEditError("a Ray address is for --backend ray")
    config = bench_suite(suite)
    method_options = _pinned_options(methods, method_options)
    out = Path(out)
    cells = expand_grid(methods, personas, strengths)
    judge = judge or TextJudge.load()
    report = on_progress or (lambda done, total, label: None)
    for folder in (out, out / "edits"):
        remove_stale_temporaries_in(folder)  # what a killed run was writing (an edit, a report page)
    with ResultStore(out / RESULTS) as store:
        store.check_run({"model_fingerprint": lm.fingerprint, "suite": suite, "judge": judge_identity(judge)},
                        method_options)
        done = store.done()
        references = [base_key()] + [base_key(p) for p in personas]
        total = len(cells) + len(references)
        count = [sum(k in done for k in references) + sum(c.key in done for c in cells)]

        def finished(key: str, method: str, persona: str, strength: float, result: dict[str, Any]) -> None:
            store.put(key, method, persona, strength, result)
            count[0] += 1
            report(count[0], total, key)

        report(count[0], total, "base model")
        base = store.get(base_key())
        if base is None:
            base = base_measurement(lm, judge, config)
            finished(base_key(), BASE, "", 0.0, base)
        for persona in personas:
            if base_key(persona) not in done:
                report(count[0], total, f"base model under a prompt against {persona}")
                parsed = Persona.parse(persona)
                reference = {"towards": towards(parsed, base["scores"]),
                             "robust_towards": robust_base(lm, judge, config, parsed)}
                finished(base_key(persona), BASE, persona, 0.0, reference)

        todo = group_cells([c for c in cells if c.key not in done])
        if backend == "ray":
            from personaedit.bench.ray_backend import connect, run_groups_on_ray

            def failed(keys: list[str], attempt: int, worker: str, error: str) -> None:
                with FailureLog(out / RESULTS) as log:
                    log.record(keys, attempt, worker, error)
                report(count[0], total, f"attempt {attempt} at {keys[0]} failed on {worker}: {error}")

            connect(ray_address)
            measured = run_groups_on_ray(lm.spec, todo, suite, base, out / "edits", method_options, on_failure=failed,
                                         on_stage=lambda label: report(count[0], total, label))
        else:
            measured = (item for group in todo for item in
                        run_group(lm, judge, config, group, base, out / "edits", method_options.get(group[0].method),
                                  on_stage=lambda label: report(count[0], total, label)))
        for cell, result in measured:
            finished(cell.key, cell.method, cell.persona, cell.strength, result)
            fault_point("bench.cell")
    return out / RESULTS
