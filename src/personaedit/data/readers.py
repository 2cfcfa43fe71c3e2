"""Reading the files of external data sets: UTF-8 text (a byte-order mark tolerated), CSV tables with their
columns checked, names matched case-insensitively with aliases; every problem a one-line `InputFileError`
that names the file."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterator, Sequence

from personaedit.errors import InputFileError

Rows = list[tuple[int, list[str]]]  # (line number, fields) of a CSV file


def read_text(path: str | Path) -> tuple[Path, str]:
    """The file's text, decoded as UTF-8 with an optional byte-order mark."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if not p.is_file():
        raise InputFileError(f"{p}: not a file")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{p}: not UTF-8 text (undecodable byte at offset {error.start})") from None
    except OSError as error:
        raise InputFileError(f"{p}: cannot be read ({error.strerror or error})") from None
    if not text.strip():
        raise InputFileError(f"{p}: the file is empty")
    return p, text


def csv_table(p: Path, text: str, escaped_commas: bool = False) -> tuple[list[str], Rows]:
    """Normalised column names and (line number, fields) rows of a CSV (or tab-separated) text.

    Files that escape commas as `_comma_` (EmpatheticDialogues) were written without quoting, so a quote
    that opens a field is text there: when normal CSV reading gives rows that do not fit the header or
    fields spanning lines, such a file is read again with quote characters taken literally.
    """
    if text.lstrip().startswith(("{", "[")):
        raise InputFileError(f"{p}: not CSV (it looks like JSON)")
    header_line = next(line for line in text.splitlines() if line.strip())
    delimiter = "\t" if "\t" in header_line and "," not in header_line else ","
    try:
        quoted = _parse_csv(text, delimiter, csv.QUOTE_MINIMAL)
    except csv.Error as error:
        if not escaped_commas:
            raise InputFileError(f"{p}: not valid CSV ({error})") from None
        quoted = None
    if not escaped_commas or (quoted is not None and _fits_header(quoted) and not _spans_lines(quoted)):
        return _with_columns(p, quoted)
    try:
        literal = _parse_csv(text, delimiter, csv.QUOTE_NONE)
    except csv.Error as error:
        raise InputFileError(f"{p}: not valid CSV ({error})") from None
    return _with_columns(p, literal if quoted is None or _fits_header(literal) else quoted)


def _parse_csv(text: str, delimiter: str, quoting: int) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = []
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((reader.line_num, fields))
    except csv.Error as error:
        raise csv.Error(f"line {reader.line_num}: {error}") from None
    return rows


def _spans_lines(rows: Rows) -> bool:
    return any("\n" in f or "\r" in f for _, fields in rows for f in fields)


def _fits_header(rows: Rows) -> bool:
    width = len(rows[0][1]) if rows else 0
    return all(len(fields) <= width for _, fields in rows)


def _with_columns(p: Path, rows: Rows) -> tuple[list[str], Rows]:
    if not rows:
        raise InputFileError(f"{p}: the file is empty")
    columns = [normal_name(c).strip('"') for c in rows[0][1]]
    return columns, rows[1:]


def rows_as_dicts(columns: Sequence[str], rows: Rows) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows as {column: value}; short rows are padded with '', extra fields dropped, first duplicate wins."""
    for line, fields in rows:
        row: dict[str, str] = {}
        for i, column in enumerate(columns):
            row.setdefault(column, fields[i] if i < len(fields) else "")
        yield line, row


def require_columns(p: Path, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(c for c in columns if c) or "none"
        raise InputFileError(
            f"{p}: missing required column(s) {', '.join(repr(c) for c in missing)} (found columns: {found})"
        )


def normal_name(name: Any) -> str:
    return str(name).strip().lower()


def canonical_name(value: Any, options, aliases: dict[str, str]) -> str | None:
    """The canonical name `value` stands for (any case, aliases allowed), or None."""
    name = normal_name(value)
    name = aliases.get(name, name)
    return name if name in options else None


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


def listing(mapping: dict) -> str:
    return ", ".join(str(k) for k in mapping) or "none"


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
