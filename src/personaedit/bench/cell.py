"""The cells of one (method, persona): fit the edit once (or take the one an earlier run saved), then measure it at
each strength. The local backend runs this in the driver, the Ray backend in a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from personaedit.bench.grid import Cell
from personaedit.bench.measure import BenchSuite, measure_condition, neutral_prompts, peak_memory, towards
from personaedit.edits import load_edit
from personaedit.models.scoring import next_token_logprobs
from personaedit.methods.registry import fit_edit
from personaedit.models import LoadedModel
from personaedit.persona import Persona
from personaedit.progress import Stage



def fitted(lm: LoadedModel, cell: Cell, options: dict[str, Any], edits_dir: Path, on_stage: Stage):
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
    edit, cost = fitted(lm, cells[0], options or {}, edits_dir, on_stage)
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
