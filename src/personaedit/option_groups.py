"""Option groups: options that several functions share, declared once.

A group is a frozen dataclass whose fields made with `option(default, help)` are options; a function takes the
group as one keyword parameter (`value: ValueOptions = ValueOptions()` in a method's fit). The method registry
flattens groups into plain options (`--steps`, `--lr`, ... on the command line, `steps=` in `fit_edit`,
`palette.steps=` in a bench) and folds flat options back into the group for the fit; `vector train`'s flags
are its `TrainOptions` fields. A field's flag is `--` and its name with dashes unless it names another.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, NamedTuple


class Option(NamedTuple):
    """One option of a group: its default, type, one-line help, command-line flag and smallest value."""

    default: Any
    annotation: Any
    help: str
    flag: str
    min: float | None = None


def option(default: Any, help: str, *, flag: str | None = None, min: float | None = None) -> Any:  # noqa: A002
    """A field of an option group: its default and its one-line help; `flag` when the command line spells it
    otherwise than `--NAME-WITH-DASHES`, `min` when smaller values are refused there."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "min": min})


def flag_of(name: str) -> str:
    """The command-line flag of an option named `name`."""
    return "--" + name.replace("_", "-")


def is_group(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def group_options(group: Any) -> dict[str, Option]:
    """name -> Option of a group instance's option fields, its values as defaults."""
    hints = typing.get_type_hints(type(group))
    return {f.name: Option(getattr(group, f.name), hints[f.name], f.metadata["help"],
                           f.metadata.get("flag") or flag_of(f.name), f.metadata.get("min"))
            for f in dataclasses.fields(group) if "help" in f.metadata}
