"""Data written by the project, shipped as package resources (see docs/DATASHEET.md)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from personaedit.errors import InputFileError

SPLITS = ("train", "validation", "test")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> tuple[dict[str, Any], ...]:
    path = resources.files("personaedit.data") / "resources" / f"{name}.jsonl"
    if not path.is_file():
        raise InputFileError(f"package data {name!r} is missing from this installation")
    with path.open(encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def records(name: str, split: str | None = None, **where: Any) -> list[dict[str, Any]]:
    """Rows of resource `name` (e.g. 'neutral_questions'), optionally of one split and matching fields."""
    if split is not None and split not in SPLITS:
        raise InputFileError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    rows = _read(name)
    return [
        dict(r) for r in rows
        if (split is None or r.get("split") == split) and all(r.get(k) == v for k, v in where.items())
    ]
