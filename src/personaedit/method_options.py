"""What `personaedit edit METHOD` offers, without importing the methods: each method's options (type, default,
help), pretty name, summary and reference, as the registry derives them from the fit functions, kept in
`method_options.json` beside this module. Building the commands from the registry imports every method and
torch (seconds); from this file, `personaedit edit steer --help` answers as fast as `personaedit --help`.

The file is derived, never edited by hand: `python -m personaedit.method_options` writes it again, and
tests/test_method_options.py fails when it differs from what the registry says.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

_FILE = "method_options.json"
_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: str  # bool | int | float | str
    optional: bool  # None is a value (`int | None`)
    required: bool
    default: Any
    help: Optional[str]

    @property
    def annotation(self) -> Any:
        kind = _TYPES[self.type]
        return Optional[kind] if self.optional else kind

    @property
    def default_or_empty(self) -> Any:
        return inspect.Parameter.empty if self.required else self.default


@dataclass(frozen=True)
class MethodSpec:
    name: str
    pretty_name: str
    summary: str
    reference: str
    calibrated: bool
    options: tuple[OptionSpec, ...]


def load() -> dict[str, MethodSpec]:
    """Every method's command-line face, in the registry's order."""
    rows = json.loads(resources.files("personaedit").joinpath(_FILE).read_text(encoding="utf-8"))
    return {row["name"]: MethodSpec(**{**row, "options": tuple(OptionSpec(**o) for o in row["options"])})
            for row in rows}


def derive() -> list[dict[str, Any]]:
    """The file's content, from the registry (imports every method, and torch)."""
    from personaedit.methods import all_methods

    rows = []
    for method in all_methods().values():
        helps = method.option_help()
        options = []
        for name, param in method.options().items():
            kind, optional = _type_name(param.annotation)
            required = param.default is inspect.Parameter.empty
            if not required and not isinstance(param.default, (bool, int, float, str, type(None))):
                raise TypeError(f"{method.name}.{name}: default {param.default!r} is not a command-line value")
            options.append({"name": name, "type": kind, "optional": optional, "required": required,
                            "default": None if required else param.default, "help": helps.get(name)})
        rows.append({"name": method.name, "pretty_name": method.pretty_name, "summary": method.summary,
                     "reference": method.reference, "calibrated": method.calibrated, "options": options})
    return rows


def _type_name(annotation: Any) -> tuple[str, bool]:
    """(`int`, False) for int, (`int`, True) for `int | None`."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"option type {annotation!r} is not one type or None")
        return _type_name(kinds[0])[0], True
    for name, kind in _TYPES.items():
        if annotation is kind:
            return name, False
    raise TypeError(f"option type {annotation!r} has no command-line form "
                    "(bool, int, float, str, or one of them | None)")


def write(path: Path | None = None) -> Path:
    from personaedit.fileio import write_text_atomic

    target = path or Path(__file__).with_name(_FILE)
    write_text_atomic(target, json.dumps(derive(), indent=1, ensure_ascii=False) + "\n")
    return target


if __name__ == "__main__":
    print(f"wrote {write()}")
