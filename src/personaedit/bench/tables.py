"""A bench folder's results.sqlite, opened for one set of its tables: the results (store.py) and the failed
attempts (failures.py) each declare their schema; opening makes the folder and any table not there yet."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import ClassVar, Self

from personaedit.errors import PersonaEditError


class Tables:
    """The file at `path` with the tables of `SCHEMA` (created on first use); a context manager that closes it."""

    SCHEMA: ClassVar[str]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.executescript(self.SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise PersonaEditError(f"{self.path} is not a personaedit results store: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
