"""The Edit protocol: a saved, inspectable value that is applied to a model at a strength and removed.

`edit.apply(lm, strength)` is a context manager; on exit the model is bit-for-bit what it was and every
hook is gone, also when an exception escapes. `edit.save(dir)` writes `edit.json` (+ `tensors.safetensors`),
`load_edit(dir)` reads it back. Edits scale (`0.5 * e`) and compose (`e1 + e2`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from personaedit.errors import EditError
from personaedit.fileio import atomic_dir, give_usual_mode
from personaedit.models.loading import LoadedModel
from personaedit.persona import Persona

FORMAT = "personaedit-edit"
FORMAT_VERSION = 1
EDIT_JSON = "edit.json"
TENSORS_FILE = "tensors.safetensors"


@dataclass(frozen=True)
class BaseModelInfo:
    """What an edit knows of the model it was fitted on."""

    fingerprint: str
    spec: str
    model_type: str
    layers: int
    hidden_size: int
    mlp_size: int

    @classmethod
    def of(cls, lm: LoadedModel) -> "BaseModelInfo":
        return cls(lm.fingerprint, lm.spec, lm.arch.model_type, lm.arch.num_layers, lm.arch.hidden_size, lm.arch.mlp_size)


@dataclass(frozen=True)
class Description:
    """What `personaedit info` shows of an edit: a title, lines of text, at most one table, and its parts."""

    title: str
    lines: tuple[str, ...] = ()
    table: tuple[tuple[str, ...], tuple[tuple[str, ...], ...]] | None = None  # (column names, rows)
    parts: tuple[tuple[float, "Description"], ...] = ()  # (weight, part) of a composed edit


def _calibration_line(calibration: dict[str, Any]) -> str:
    effect = calibration["validation"]["effect"]
    return (f"calibrated for this model: strength {calibration['strength']:g} (the edit's scale)"
            f"{' with ' + json.dumps(calibration['options']) if calibration['options'] else ''}; on "
            f"{calibration['questions']} validation questions effect {effect['mean']:+.3f} "
            f"[{effect['low']:+.3f}, {effect['high']:+.3f}] ({effect['verdict']}), coherent "
            f"{calibration['validation']['coherent_share']:.0%}, perplexity "
            f"×{calibration['validation']['perplexity_ratio']:.2f}")


@dataclass(frozen=True)
class Edit(ABC):
    """Common fields of every edit; subclasses add their payload and how to apply it."""

    method: str
    persona: Persona | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the fit's options as recorded, and what it resolved
    base: BaseModelInfo | None = None
    scale: float = 1.0  # this edit's own multiplier: applied at strength s it acts at s × scale

    kind: ClassVar[str] = ""

    # --- describing -------------------------------------------------------------------------
    def describe(self) -> Description:
        """The edit in words: method, persona, options (and a calibration), base model, then what its kind adds."""
        lines = []
        if self.persona:
            lines.append(f"persona: {self.persona.spec()}")
        calibration = self.options.get("calibration") if self.options else None
        if self.options:
            lines.append(f"options: {json.dumps({k: v for k, v in self.options.items() if k != 'calibration'}, sort_keys=True)}")
        if calibration:
            lines.append(_calibration_line(calibration))
        if self.base:
            b = self.base
            lines.append(f"base model: {b.spec} ({b.model_type}, {b.layers} layers, fingerprint {b.fingerprint})")
        details = self._details()
        title = f"{self.kind} edit · method {self.method} · scale {self.scale:g}"
        return dataclasses.replace(details, title=title, lines=tuple(lines) + details.lines)

    def _details(self) -> Description:
        """What this kind of edit adds to `describe` (lines, a table, parts)."""
        return Description("")

    # --- applying ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def apply(self, lm: LoadedModel, strength: float = 1.0, *, force: bool = False) -> Iterator[LoadedModel]:
        """Apply at `strength` (times this edit's scale) for the duration of the block."""
        self.check_fits(lm, force=force)
        with self._applied(lm, float(strength) * self.scale):
            yield lm

    @abstractmethod
    def _applied(self, lm: LoadedModel, strength: float) -> contextlib.AbstractContextManager[None]:
        """Make the change and undo it exactly on exit."""

    def check_fits(self, lm: LoadedModel, *, force: bool = False) -> None:
        """Refuse a model with another fingerprint (unless forced) or with other shapes (always)."""
        if self.base is not None and self.base.fingerprint != lm.fingerprint and not force:
            raise EditError(
                f"this {self.method} edit was made for model {self.base.spec!r} (fingerprint {self.base.fingerprint}), "
                f"not {lm.spec!r} ({lm.fingerprint}); pass force=True (--force) to transfer it"
            )
        for where, needed, actual in self.shape_requirements(lm):
            if tuple(needed) != tuple(actual):
                raise EditError(f"edit does not fit {lm.spec!r}: {where} needs shape {tuple(needed)}, model has {tuple(actual)}")

    def shape_requirements(self, lm: LoadedModel) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(where, shape the edit needs, shape the model has) for every place the edit touches."""
        return []

    # --- arithmetic -------------------------------------------------------------------------
    def scaled(self, factor: float) -> "Edit":
        return dataclasses.replace(self, scale=self.scale * float(factor))

    def __mul__(self, factor: float) -> "Edit":
        return self.scaled(factor)

    __rmul__ = __mul__

    def __neg__(self) -> "Edit":
        return self.scaled(-1.0)

    def __add__(self, other: "Edit") -> "ComposedEdit":
        return ComposedEdit.of(self, other)

    # --- saving -----------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """Kind-specific JSON fields."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Kind-specific tensors, saved as safetensors."""
        return {}

    @classmethod
    @abstractmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path) -> "Edit":
        """Rebuild from the `edit.json` fields, the tensors file, and (for nested edits) the folder."""

    def metadata(self) -> dict[str, Any]:
        from personaedit import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "persona": self.persona.as_dict() if self.persona else None,
            "options": self.options,
            "scale": self.scale,
            "base_model": dataclasses.asdict(self.base) if self.base else None,
            "version": __version__,
            "created_by": f"personaedit {__version__}",
            "payload": self.payload(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the edit into `directory` atomically (an existing edit there is replaced)."""
        directory = Path(directory)
        _refuse_foreign_folder(directory)
        with atomic_dir(directory) as tmp:
            self._write(tmp)
        return directory

    def _write(self, folder: Path) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        if tensors:
            save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT})
            give_usual_mode(folder / TENSORS_FILE)
        (folder / EDIT_JSON).write_text(json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _refuse_foreign_folder(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not (directory / EDIT_JSON).exists())):
        raise EditError(f"refusing to overwrite {directory}: it exists and is not an edit folder")


def common_fields(meta: dict[str, Any]) -> dict[str, Any]:
    base = meta.get("base_model")
    persona = meta.get("persona")
    return {
        "method": meta["method"],
        "persona": Persona.from_mapping(persona) if persona else None,
        "options": meta.get("options") or {},
        "base": BaseModelInfo(**base) if base else None,
        "scale": float(meta.get("scale", 1.0)),
    }


def read_edit_metadata(directory: str | Path) -> dict[str, Any]:
    """The checked `edit.json` of an edit folder (format and version), without loading its tensors."""
    directory = Path(directory)
    meta_path = directory / EDIT_JSON
    if not meta_path.is_file():
        raise EditError(f"{directory} is not an edit folder (no {EDIT_JSON})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise EditError(f"{meta_path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EditError(f"{meta_path} is not a personaedit edit")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise EditError(f"{meta_path}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise EditError(f"{directory} was written by a newer personaedit (format {version}); upgrade to read it")
    return meta


def read_edit_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The edit's tensors, refusing an unreadable file (truncated, not safetensors) and non-finite values."""
    path = directory / TENSORS_FILE
    if not path.is_file():
        return {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EditError(f"{path} is not a readable safetensors file ({reason})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise EditError(f"{path}: tensor {name!r} holds values that are not finite (nan or inf)")
    return tensors


def load_edit(directory: str | Path) -> "Edit":
    """Read an edit saved with `Edit.save`."""
    from personaedit.edits import EDIT_KINDS

    directory = Path(directory)
    meta = read_edit_metadata(directory)
    kind = meta.get("kind")
    if kind not in EDIT_KINDS:
        raise EditError(f"{directory}: unknown edit kind {kind!r} (valid: {', '.join(EDIT_KINDS)})")
    tensors = read_edit_tensors(directory) if kind != "composed" else {}
    try:
        edit = EDIT_KINDS[kind].from_saved(meta, tensors, directory)
    except KeyError as exc:
        raise EditError(f"{directory}: malformed {kind} edit (no {exc} in {EDIT_JSON} or {TENSORS_FILE})") from None
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise EditError(f"{directory}: malformed {kind} edit ({type(exc).__name__}: {exc})") from None
    if not math.isfinite(edit.scale):
        raise EditError(f"{directory}: scale must be a finite number, got {edit.scale}")
    return edit


@dataclass(frozen=True)
class ComposedEdit(Edit):
    """Several edits applied together, each at its own weight (times the overall strength)."""

    parts: tuple[tuple[Edit, float], ...] = ()
    kind: ClassVar[str] = "composed"

    @classmethod
    def of(cls, *edits: Edit, weights: list[float] | None = None) -> "ComposedEdit":
        flat: list[tuple[Edit, float]] = []
        for edit, weight in zip(edits, weights or [1.0] * len(edits)):
            if isinstance(edit, ComposedEdit):
                flat += [(part, w * weight * edit.scale) for part, w in edit.parts]
            else:
                flat.append((edit, weight))
        return cls(method="+".join(e.method for e, _ in flat), parts=tuple(flat))

    def check_fits(self, lm: LoadedModel, *, force: bool = False) -> None:
        for part, _ in self.parts:
            part.check_fits(lm, force=force)

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part, weight in self.parts:
                stack.enter_context(part._applied(lm, strength * weight * part.scale))
            yield

    def _write(self, folder: Path) -> None:
        for index, (part, _) in enumerate(self.parts):
            sub = folder / f"part-{index}"
            sub.mkdir()
            part._write(sub)
        super()._write(folder)

    def payload(self) -> dict[str, Any]:
        return {"parts": [{"dir": f"part-{i}", "weight": w} for i, (_, w) in enumerate(self.parts)]}

    def _details(self) -> Description:
        return Description("", parts=tuple((weight, part.describe()) for part, weight in self.parts))

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "ComposedEdit":
        parts = tuple((load_edit(directory / p["dir"]), float(p["weight"])) for p in meta["payload"]["parts"])
        fields = common_fields(meta)
        return cls(method=fields["method"], scale=fields["scale"], parts=parts)
