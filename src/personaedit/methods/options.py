"""Option groups: options that several methods share, declared once.

A group is a frozen dataclass whose fields made with `option(default, help)` are method options; a
fit function takes the group as one keyword parameter (`value: ValueOptions = ValueOptions()`). The
registry flattens groups into plain options (`--steps`, `--lr`, ... on the command line, `steps=` in
`fit_edit`, `palette.steps=` in a bench) and folds flat options back into the group for the fit.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def option(default: Any, help: str) -> Any:  # noqa: A002 - the word the CLI uses
    """A field of an option group: its default and its one-line help."""
    return dataclasses.field(default=default, metadata={"help": help})


def is_group(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def group_options(group: Any) -> dict[str, tuple[Any, Any, str]]:
    """name -> (default, annotation, help) of a group instance's option fields."""
    hints = typing.get_type_hints(type(group))
    return {f.name: (getattr(group, f.name), hints[f.name], f.metadata["help"])
            for f in dataclasses.fields(group) if "help" in f.metadata}
