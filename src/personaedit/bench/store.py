"""Benchmark results in an embedded SQLite file: one row per finished cell, written in one transaction,
so a killed run leaves only whole rows and a re-run skips them."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from personaedit.bench.tables import Tables
from personaedit.errors import PersonaEditError


class ResultStore(Tables):
    """`results.sqlite` in the bench folder; also remembers the model and suite it was made with."""

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

    # --- run identity -------------------------------------------------------------------------
    def check_run(self, identity: dict[str, Any], method_options: dict[str, dict[str, Any]] | None = None) -> None:
        """Pin the folder to one model, suite and judge (`identity`) and each method to its fit options:
        resuming with others would mix incomparable rows. Methods, personas and strengths may be added or
        dropped (cells are independent); a method's options are pinned the first time it runs here."""
        stored = self.pins()
        problem = pin_conflict(stored, self.methods(), identity, method_options or {})
        if problem:
            raise PersonaEditError(f"{self.path.parent} {problem}; use another --out folder")
        pinned = {**stored.get("method_options", {}), **(method_options or {})}
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?)", [(k, json.dumps(v)) for k, v in identity.items()])
            self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?)", ("method_options", json.dumps(pinned, sort_keys=True)))

    def pins(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._db.execute("SELECT key, value FROM runs")}

    def methods(self) -> set[str]:
        """Methods with stored cells (the base model's rows aside)."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT method FROM cells")}

    @classmethod
    def read_only(cls, path: str | Path) -> "ResultStore | None":
        """The store at `path` opened for reading (None if there is none); creates and changes nothing."""
        path = Path(path)
        if not path.is_file():
            return None
        store = cls.__new__(cls)
        store.path = path
        try:
            store._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            store._db.execute("SELECT key, value FROM runs").fetchall()
            store._db.execute("SELECT method FROM cells LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise PersonaEditError(f"{path} is not a personaedit results store: {exc}") from None
        return store

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


BASE_METHOD = "base"


def pin_conflict(stored: dict[str, Any], stored_methods: set[str], identity: dict[str, Any],
                 method_options: dict[str, dict[str, Any]]) -> str | None:
    """Why a run with `identity` and `method_options` cannot add to a folder with these pins and cells (None
    if it can). Only what changes results is compared: model, suite, judge, and the options of methods that
    both runs have. A folder from before per-method pins has {} (every method at its defaults) or every
    method of its run; its methods without a pin ran at their defaults."""
    for key, value in identity.items():
        if key in stored and stored[key] != value:
            return f"holds results for {key} {stored[key]!r}, not {value!r}"
    pinned = dict(stored.get("method_options") or {})
    for method in stored_methods - {BASE_METHOD}:
        pinned.setdefault(method, {})
    for method, options in method_options.items():
        if method in pinned and pinned[method] != options:
            return (f"holds results for method {method} with options {pinned[method] or 'the defaults'}, not "
                    f"{options or 'the defaults'}")
    return None
