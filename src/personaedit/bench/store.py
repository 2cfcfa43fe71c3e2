"""Benchmark results in an embedded SQLite file: one row per finished cell, written in one transaction,
so a killed run leaves only whole rows and a re-run skips them."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from personaedit.errors import PersonaEditError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    persona TEXT NOT NULL,
    strength REAL NOT NULL,
    result TEXT NOT NULL,
    finished REAL NOT NULL
);
"""


class ResultStore:
    """`results.sqlite` in the bench folder; also remembers the model and suite it was made with."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise PersonaEditError(f"{self.path} is not a personaedit results store: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- run identity -------------------------------------------------------------------------
    def check_run(self, identity: dict[str, Any]) -> None:
        """Pin the folder to one (model, suite, options, judge): resuming with another one would mix incomparable rows."""
        stored = dict(self._db.execute("SELECT key, value FROM runs"))
        if not stored:
            with self._db:
                self._db.executemany("INSERT INTO runs VALUES (?, ?)", [(k, json.dumps(v)) for k, v in identity.items()])
            return
        for key, value in identity.items():
            if key in stored and json.loads(stored[key]) != value:
                raise PersonaEditError(
                    f"{self.path.parent} holds results for {key} {json.loads(stored[key])!r}, not {value!r}; "
                    "use another --out folder"
                )

    # --- cells ----------------------------------------------------------------------------------
    def done(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT key FROM cells")}

    def put(self, key: str, method: str, persona: str, strength: float, result: dict[str, Any]) -> None:
        with self._db:  # one transaction: the row is there whole or not at all
            self._db.execute("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?)",
                             (key, method, persona, strength, json.dumps(result), time.time()))

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT result FROM cells WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def rows(self) -> Iterator[dict[str, Any]]:
        query = "SELECT method, persona, strength, result FROM cells ORDER BY method, persona, strength"
        for method, persona, strength, result in self._db.execute(query):
            yield {"method": method, "persona": persona, "strength": strength, **json.loads(result)}
