"""Cells that failed on a worker, kept in the bench folder's results.sqlite beside the results (table `failures`):
one row per failed attempt, so a cell that failed and was run again is on record, and one that kept failing is
named rather than lost. The results themselves (table `cells`) hold only finished cells."""

from __future__ import annotations

import time
from typing import Any, Sequence

from personaedit.bench.tables import Tables


class FailureLog(Tables):
    """The `failures` table of a results store (created on first use)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS failures (
        key TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker TEXT NOT NULL,
        error TEXT NOT NULL,
        failed REAL NOT NULL
    );
    """

    def record(self, keys: Sequence[str], attempt: int, worker: str, error: str) -> None:
        """One failed attempt at the cells `keys` (one task ran them together), written in one transaction."""
        with self._db:
            self._db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?, ?)",
                                 [(key, attempt, worker, error, time.time()) for key in keys])

    def rows(self) -> list[dict[str, Any]]:
        query = "SELECT key, attempt, worker, error, failed FROM failures ORDER BY failed, key"
        return [dict(zip(("key", "attempt", "worker", "error", "failed"), row)) for row in self._db.execute(query)]
