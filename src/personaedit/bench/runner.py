"""Run a benchmark grid: measure the base model once, fit each (method, persona) once (saved under
DIR/edits and reused), measure every strength, and store each cell as soon as it is finished; a re-run
skips finished cells. Cells run here (local) or as Ray tasks on an existing cluster (ray)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from personaedit.bench.grid import Cell, expand_grid
from personaedit.bench.measure import (BenchSuite, base_measurement, bench_suite, judge_identity,
                                       measure_condition, neutral_prompts, peak_memory, robust_base, towards)
from personaedit.bench.store import ResultStore, pin_conflict
from personaedit.edits import load_edit
from personaedit.errors import PersonaEditError
from personaedit.faults import fault_point
from personaedit.fileio import remove_stale_temporaries_in
from personaedit.eval.metrics import next_token_logprobs
from personaedit.methods.registry import fit_edit
from personaedit.models import LoadedModel
from personaedit.persona import Persona

Progress = Callable[[int, int, str], None]
Stage = Callable[[str], None]
BACKENDS = ("local", "ray")
BASE = "base"


def base_key(persona: str = "") -> str:
    """Key of the base model's row ("") and of its reference row for one persona."""
    return Cell(BASE, persona, 0.0).key


def _fitted(lm: LoadedModel, cell: Cell, options: dict[str, Any], edits_dir: Path, on_stage: Stage):
    """The edit for `cell` (saved by an earlier run, or fitted now and saved) and its fit cost."""
    folder = edits_dir / cell.fit_key
    if (folder / "edit.json").is_file():
        return load_edit(folder), None
    on_stage(f"fitting {cell.method} for {cell.persona}")
    with peak_memory() as cost:
        edit = fit_edit(cell.method, lm, cell.persona, **options)
    edit.save(folder)
    return edit, cost


def run_group(lm: LoadedModel, judge: Any, suite: BenchSuite, cells: Sequence[Cell], base: dict[str, Any],
              edits_dir: Path, options: dict[str, Any] | None = None,
              on_stage: Stage = lambda _: None) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Fit once (with the method's `options`), then measure each cell of one (method, persona); strength 0
    is the base model for every edit kind (applying at 0 changes nothing), so it reuses the base measurement."""
    edit, cost = _fitted(lm, cells[0], options or {}, edits_dir, on_stage)
    persona = Persona.parse(cells[0].persona)
    base_next = next_token_logprobs(lm, neutral_prompts(suite))
    for cell in cells:
        on_stage(f"{cell.method} · {cell.persona} · strength {cell.strength:g}")
        if cell.strength == 0:
            result = {**base, "towards": towards(persona, base["scores"]), "kl_to_base": 0.0, "from_base": True}
        else:
            with edit.apply(lm, cell.strength):
                result = measure_condition(lm, judge, suite, persona, base_next)
        yield cell, {**result, "fit": cost}  # fit None: the edit came from an earlier run


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
    method_options: dict[str, dict[str, Any]] | None = None,
    judge: Any = None,
    on_progress: Progress | None = None,
) -> Path:
    """Run every missing cell of the grid into DIR/results.sqlite; returns the store's path.

    `method_options` maps a method to options for its fit (e.g. {"dpnle": {"pairs": 500}}); a folder
    remembers its model, suite and judge and each method's options, and refuses to resume with others
    (`check_resumable` says so before the model is loaded); methods, personas and strengths may change."""
    from personaedit.eval.text_judge import TextJudge

    if backend not in BACKENDS:
        raise PersonaEditError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
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
            from personaedit.bench.ray_backend import run_groups_on_ray

            measured = run_groups_on_ray(lm.spec, todo, suite, base, out / "edits", method_options)
        else:
            measured = (item for group in todo for item in
                        run_group(lm, judge, config, group, base, out / "edits", method_options.get(group[0].method),
                                  on_stage=lambda label: report(count[0], total, label)))
        for cell, result in measured:
            finished(cell.key, cell.method, cell.persona, cell.strength, result)
            fault_point("bench.cell")
    return out / RESULTS
