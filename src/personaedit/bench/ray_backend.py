"""Cells as Ray tasks on an existing Ray cluster (or a local one started by `ray.init()`): each task loads
the model, fits one (method, persona) and measures its strengths; the driver alone writes the store.
On a multi-node cluster the bench folder must be on a shared filesystem (fitted edits are saved there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from personaedit.bench.grid import Cell
from personaedit.errors import PersonaEditError


def _task(model_spec: str, cells: Sequence[Cell], suite: str, base: dict[str, Any], edits_dir: str,
          options: dict[str, Any]):
    from personaedit.bench.measure import bench_suite
    from personaedit.bench.runner import run_group
    from personaedit.eval.text_judge import TextJudge
    from personaedit.models import load_model

    lm = load_model(model_spec)
    return list(run_group(lm, TextJudge.load(), bench_suite(suite), cells, base, Path(edits_dir), options))


def run_groups_on_ray(model_spec: str, groups: Sequence[Sequence[Cell]], suite: str, base: dict[str, Any],
                      edits_dir: Path, method_options: dict[str, dict[str, Any]],
                      num_cpus: float = 1) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Submit one task per group; yield finished cells as tasks complete."""
    try:
        import ray
    except ImportError:
        raise PersonaEditError("--backend ray needs Ray: pip install 'personaedit[ray]'") from None
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)  # joins RAY_ADDRESS's cluster if set, else starts one
    remote = ray.remote(num_cpus=num_cpus)(_task)
    pending = [remote.remote(model_spec, list(g), suite, base, str(edits_dir), method_options.get(g[0].method, {}))
               for g in groups]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready[0])
