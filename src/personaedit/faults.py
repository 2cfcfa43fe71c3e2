"""A test hook that kills the process at a named point, so fault tests hit the dangerous moments on purpose.

`PERSONAEDIT_FAULT_AT=STAGE:N` makes the N-th call (from 1) of `fault_point(STAGE)` in this process send
SIGKILL to itself (no cleanup, no `finally`, like `kill -9` or the OOM killer). Unset, a call costs one
environment lookup. Named points:

- `atomic_dir.commit`: an atomic folder is written in full, not yet renamed into place;
- `atomic_dir.swap`: the old folder has been moved aside, the new one not yet renamed into place;
- `atomic_path.commit`: an atomic file is written, not yet renamed into place;
- `merge.tensor`: after each tensor handed to the merge writer;
- `distill.batch`: after each batch of distilled examples appended to examples.partial.jsonl;
- `train.step`: after each optimiser step of `vector train`;
- `train.checkpoint`: inside a checkpoint save, after the weights and before the optimiser and trainer state;
- `bench.cell`: after each bench cell is stored.
"""

from __future__ import annotations

import os
import signal

ENV = "PERSONAEDIT_FAULT_AT"
_calls: dict[str, int] = {}


def fault_point(stage: str) -> None:
    """Kill this process here if PERSONAEDIT_FAULT_AT names this stage and this is the named call."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name != stage:
        return
    _calls[stage] = _calls.get(stage, 0) + 1
    if str(_calls[stage]) == count.strip():
        os.kill(os.getpid(), signal.SIGKILL)
