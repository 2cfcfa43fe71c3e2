"""Cells that failed on a worker, kept in the bench folder's results.sqlite beside the results (table `failures`):
one row per failed attempt, so a cell that failed and was run again is on record, and one that kept failing is
named rather than lost. The results themselves (table `cells`) hold only finished cells."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    error TEXT NOT NULL,
    failed REAL NOT NULL
);
"""


class FailureLog:
    """The `failures` table of a results store (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(Path(path), timeout=30)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "FailureLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, keys: Sequence[str], attempt: int, worker: str, error: str) -> None:
        """One failed attempt at the cells `keys` (one task ran them together), written in one transaction."""
        with self._db:
            self._db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?, ?)",
                                 [(key, attempt, worker, error, time.time()) for key in keys])

    def rows(self) -> list[dict[str, Any]]:
        query = "SELECT key, attempt, worker, error, failed FROM failures ORDER BY failed, key"
        return [dict(zip(("key", "attempt", "worker", "error", "failed"), row)) for row in self._db.execute(query)]
