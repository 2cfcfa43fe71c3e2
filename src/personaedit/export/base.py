"""What every export format shares: the error that names the formats an edit can take, the result of an
export, composed edits flattened to (leaf edit, factor), and where the model an edit was made for lives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from personaedit.edits import ComposedEdit, Edit
from personaedit.errors import PersonaEditError

FORMATS = ("peft", "control-vector", "gguf", "prompt")
RECORD_FILE = "personaedit-export.json"


class ExportError(PersonaEditError):
    """An edit that cannot go into the format asked for; `formats` are the ones it can go into."""

    def __init__(self, message: str, formats: Iterable[str] = ()) -> None:
        self.formats = tuple(formats)
        can = ", ".join(self.formats) if self.formats else "none: export its parts one by one, or use it with personaedit"
        super().__init__(f"{message} (this edit can be exported as: {can})")


@dataclass
class ExportResult:
    """What an export wrote: `what` is a short phrase for the one line the CLI prints."""

    format: str
    path: Path
    bytes: int
    seconds: float
    what: str
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        notes = "; " + "; ".join(self.notes) if self.notes else ""
        return f"{self.format}: wrote {self.path} ({self.what}, {human_size(self.bytes)}) in {self.seconds:.1f} s{notes}"


def human_size(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def leaves(edit: Edit, strength: float = 1.0) -> list[tuple[Edit, float]]:
    """The non-composed edits inside `edit`, each with the factor `edit.apply(lm, strength)` applies it at
    (the strength times every weight and scale on its way down)."""
    factor = float(strength) * edit.scale
    if isinstance(edit, ComposedEdit):
        found: list[tuple[Edit, float]] = []
        for part, weight in edit.parts:
            found += leaves(part, factor * weight)
        return found
    return [(edit, factor)]


def describe_edit(edit: Edit) -> str:
    return f"{edit.method} edit" if not isinstance(edit, ComposedEdit) else f"composed edit ({edit.method})"


def kind_phrase(edit: Edit, leaf: Edit) -> str:
    """'this steer edit is an activation edit' / 'this composed edit (a+b) contains an activation edit (a)'."""
    article = "an" if leaf.kind[0] in "aeiou" else "a"
    if leaf is edit:
        return f"this {edit.method} edit is {article} {leaf.kind} edit"
    return f"this {describe_edit(edit)} contains {article} {leaf.kind} edit ({leaf.method})"


def model_spec_for(edit: Edit | None, model: str | None) -> str:
    """`--model` when given, else the spec of the model the edit was fitted on."""
    if model:
        return model
    for leaf, _ in leaves(edit) if edit is not None else []:
        if leaf.base is not None:
            return leaf.base.spec
    raise PersonaEditError("the edit does not say which model it was made for: pass --model")


def skeleton(spec: str) -> tuple[Any, Path]:
    """The model of `spec` built on the meta device from its config (names, module types and shapes, no
    weights: nothing is read but config.json), and the folder it comes from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from personaedit.merge.engine import model_folder
    from personaedit.models.loading import quiet_progress

    folder = model_folder(spec)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"), quiet_progress():
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise PersonaEditError(f"cannot read the model config of {spec}: {exc}".splitlines()[0]) from None
    return model, folder


def refuse_foreign(out: Path, marker: str) -> None:
    """An existing output folder is replaced only when it is an earlier export (it holds `marker`)."""
    if out.exists() and not out.is_dir():
        raise PersonaEditError(f"refusing to overwrite {out}: it is a file, and this export writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise PersonaEditError(f"refusing to overwrite {out}: it exists and is not an earlier export")


def refuse_foreign_file(out: Path, magic: bytes) -> None:
    """An existing output file is replaced only when it starts with `magic` (an earlier export's format)."""
    if out.is_dir():
        raise PersonaEditError(f"{out} is a folder; the export writes one file")
    if out.exists():
        with open(out, "rb") as handle:
            if handle.read(len(magic)) != magic:
                raise PersonaEditError(f"refusing to overwrite {out}: it exists and is not a {magic.decode(errors='replace')} file")


def record(source: str, edit: Edit | None, **fields: Any) -> str:
    """The provenance written beside an export."""
    from personaedit import __version__

    data = {"created_by": f"personaedit {__version__}", "source": source,
            "method": edit.method if edit is not None else None,
            "persona": edit.persona.spec() if edit is not None and edit.persona else None, **fields}
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
