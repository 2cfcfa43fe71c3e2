"""Activation edits: change activations at named sites during the forward pass, through hooks.

An intervention acts on one site (residual stream, MLP hidden activation, ...) of one layer:
- add:   x[idx] += strength * values            (steering vectors, DPN-LE)
- floor: x[idx] = max(x[idx], strength * values) (raise neurons to at least a value, NPTI)
- ceil:  x[idx] = min(x[idx], values)             (clamp neurons to at most a value, NPTI)
at generated positions (default) or at every position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from personaedit.edits.base import Description, Edit, common_fields
from personaedit.errors import EditError
from personaedit.models.hooks import generated_mask, hooked
from personaedit.models.loading import LoadedModel

OPS = ("add", "floor", "ceil")
POSITIONS = ("generated", "all")


@dataclass(frozen=True)
class Intervention:
    point: str
    layer: int
    values: torch.Tensor  # full site width when indices is None, else one value per index
    indices: torch.Tensor | None = None
    op: str = "add"
    positions: str = "generated"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise EditError(f"unknown intervention op {self.op!r} (valid: {', '.join(OPS)})")
        if self.positions not in POSITIONS:
            raise EditError(f"unknown positions {self.positions!r} (valid: {', '.join(POSITIONS)})")
        if self.indices is not None and self.indices.shape != self.values.shape:
            raise EditError("intervention indices and values differ in length")

    @property
    def touched(self) -> int:
        return int(self.values.numel() if self.indices is None else self.indices.numel())

    def describe(self) -> dict[str, Any]:
        return {"point": self.point, "layer": self.layer, "op": self.op, "positions": self.positions,
                "sparse": self.indices is not None, "touched": self.touched}


def _intervene(item: Intervention, strength: float):
    """The hook body for one intervention at one strength; tensors follow the activation's device/dtype."""
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            index = None if item.indices is None else item.indices.to(hidden.device, torch.long)
            cache[key] = (item.values.to(hidden.device, hidden.dtype), index)
        values, index = cache[key]
        selected = hidden if index is None else hidden[..., index]
        if item.op == "add":
            changed = selected + strength * values
        elif item.op == "floor":
            changed = torch.maximum(selected, strength * values)
        else:
            changed = torch.minimum(selected, values)
        if item.positions == "generated":
            changed = torch.where(generated_mask(hidden), changed, selected)
        if index is None:
            return changed
        out = hidden.clone()
        out[..., index] = changed
        return out

    return fn


@dataclass(frozen=True)
class ActivationEdit(Edit):
    interventions: tuple[Intervention, ...] = field(default_factory=tuple)
    kind: ClassVar[str] = "activation"

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        sites = [(item.point, item.layer, _intervene(item, strength)) for item in self.interventions] if strength else []
        with hooked(lm.arch, sites):
            yield

    def shape_requirements(self, lm: LoadedModel):
        needs = []
        for item in self.interventions:
            where = f"{item.point} of layer {item.layer}"
            if not 0 <= item.layer < lm.arch.num_layers:
                needs.append((f"{where} (layer count)", (item.layer + 1,), (lm.arch.num_layers,)))
                continue
            width = lm.arch.site_width(item.point)
            if item.indices is None:
                needs.append((where, tuple(item.values.shape), (width,)))
            elif item.indices.numel() and int(item.indices.max()) >= width:
                needs.append((f"{where} (neuron index)", (int(item.indices.max()) + 1,), (width,)))
        return needs

    def payload(self) -> dict[str, Any]:
        return {"interventions": [item.describe() for item in self.interventions]}

    def _details(self) -> Description:
        """One row per intervention, with the share of the site's width it touches (when the base model is known)."""
        rows = []
        for item in self.interventions:
            width = None
            if self.base:
                width = self.base.mlp_size if item.point in ("mlp_hidden", "mlp_gate") else self.base.hidden_size
            share = f"{item.touched / width:.2%}" if width else "?"
            rows.append((str(item.layer), item.point, item.op, item.positions, str(item.touched), share))
        return Description("", table=(("layer", "site", "op", "positions", "neurons touched", "share"), tuple(rows)))

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, item in enumerate(self.interventions):
            out[f"{i}.values"] = item.values
            if item.indices is not None:
                out[f"{i}.indices"] = item.indices.to(torch.int64)
        return out

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "ActivationEdit":
        items = tuple(
            Intervention(
                point=d["point"], layer=int(d["layer"]), op=d["op"], positions=d["positions"],
                values=tensors[f"{i}.values"], indices=tensors.get(f"{i}.indices") if d["sparse"] else None,
            )
            for i, d in enumerate(meta["payload"]["interventions"])
        )
        return cls(**common_fields(meta), interventions=items)
