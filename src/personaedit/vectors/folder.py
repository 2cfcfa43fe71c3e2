"""A personality vector's folder, kept whole through `kill -9` at any moment: the run's record (a folder resumes
only the run it was started for), checkpoints that count once a marker lists their files, and the vector's
files, staged and moved in with edit.json last."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from personaedit.edits import WeightEdit
from personaedit.edits.base import EDIT_JSON, TENSORS_FILE
from personaedit.errors import InputFileError
from personaedit.fileio import remove_stale_temporaries, write_json_atomic

CHECKPOINT_MARKER = "personaedit-complete.json"
STAGED_VECTOR = ".staged-vector"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


def _checkpoint_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKPOINT_MARKER}


def mark_checkpoint_complete(folder: Path) -> None:
    """Record every file of a finished checkpoint with its size; the record's presence marks it complete."""
    write_json_atomic(folder / CHECKPOINT_MARKER, {"files": _checkpoint_files(folder)})


def checkpoint_complete(folder: Path) -> bool:
    """A checkpoint whose marker lists exactly the files it holds, at their sizes. A checkpoint from before
    the marker counts when its trainer state (written last by the Trainer) reads whole beside its weights and
    optimiser state."""
    marker = folder / CHECKPOINT_MARKER
    try:
        if marker.is_file():
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
            return bool(files) and _checkpoint_files(folder) == files
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    return isinstance(state, dict) and "global_step" in state and weights and "optimizer.pt" in names


def last_complete_checkpoint(folder: Path, remove_incomplete: bool = True) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (None if none); incomplete ones (a run killed while
    saving) are removed, so neither a resume nor the Trainer's checkpoint rotation trips over them."""
    if not folder.is_dir():
        return None
    found = []
    for entry in folder.iterdir():
        name, _, step = entry.name.rpartition("-")
        if name != "checkpoint" or not step.isdigit() or not entry.is_dir():
            continue
        if checkpoint_complete(entry):
            found.append((int(step), entry))
        elif remove_incomplete:
            shutil.rmtree(entry, ignore_errors=True)
    return str(max(found)[1]) if found else None


def check_run(out: Path, run: dict[str, Any]) -> None:
    """A folder resumes only the run it was started for. Only reads (every process checks, one writes)."""
    path = out / RUN_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous != run:
            changed = sorted(k for k in run if not isinstance(previous, dict) or previous.get(k) != run[k])
            raise InputFileError(f"{out} holds a training run with other settings ({', '.join(changed) or 'unreadable'}); "
                                 "use another --out or delete it")


def save_into(edit: WeightEdit, out: Path) -> None:
    """Write the edit's files into `out` beside the run's data: the old edit.json goes first, then the tensors
    replace the old ones, then edit.json is renamed in (its presence marks a complete vector). The files are
    made in `out`/.staged-vector, which a run killed meanwhile leaves for the next save to remove."""
    staged = out / STAGED_VECTOR
    shutil.rmtree(staged, ignore_errors=True)
    try:
        edit.save(staged)
        (out / EDIT_JSON).unlink(missing_ok=True)
        for name in (TENSORS_FILE, EDIT_JSON):
            if (staged / name).exists():
                os.replace(staged / name, out / name)
            elif name == TENSORS_FILE:
                (out / name).unlink(missing_ok=True)  # an edit without tensors: no stale ones beside it
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """What a killed earlier run left in `out`: a staged vector (and the temporary folders older versions used)."""
    shutil.rmtree(out / STAGED_VECTOR, ignore_errors=True)
    remove_stale_temporaries(out / STAGED_VECTOR)
    for entry in out.glob(".vector.*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
