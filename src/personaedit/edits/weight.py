"""Weight edits: add strength * ΔW to named parameters; ΔW dense or kept as low-rank factors u vᵀ.

Applying keeps a copy of each touched parameter and copies it back on exit, so removal is bit-exact
(adding and subtracting a float delta would not be).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from personaedit.edits.base import Description, Edit, common_fields
from personaedit.errors import EditError
from personaedit.models.loading import LoadedModel


@dataclass(frozen=True)
class Delta:
    """ΔW for one parameter, in that parameter's own layout: dense, or factors with ΔW = u @ vᵀ."""

    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.u is None or self.v is None):
            raise EditError("a weight delta is either dense or a pair of factors (u, v)")
        if self.u is not None and (self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]):
            raise EditError(f"factors must be [out, r] and [in, r], got {tuple(self.u.shape)} and {tuple(self.v.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int | None:
        return None if self.u is None else int(self.u.shape[1])

    def materialise(self, device: torch.device) -> torch.Tensor:
        """The dense ΔW in float32."""
        if self.dense is not None:
            return self.dense.to(device, torch.float32)
        return self.u.to(device, torch.float32) @ self.v.to(device, torch.float32).T


@dataclass(frozen=True)
class WeightEdit(Edit):
    deltas: dict[str, Delta] = field(default_factory=dict)
    kind: ClassVar[str] = "weight"

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        params = dict(lm.model.named_parameters())
        originals: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                if strength != 0:
                    for name, delta in self.deltas.items():
                        param = params[name]
                        originals[name] = param.detach().clone()
                        change = strength * delta.materialise(param.device)
                        param.copy_((param.to(torch.float32) + change).to(param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    params[name].copy_(original)

    def shape_requirements(self, lm: LoadedModel):
        params = dict(lm.model.named_parameters())
        needs = []
        for name, delta in self.deltas.items():
            if name not in params:
                raise EditError(f"edit does not fit {lm.spec!r}: the model has no parameter {name}")
            needs.append((f"parameter {name}", delta.shape, tuple(params[name].shape)))
        return needs

    def payload(self) -> dict[str, Any]:
        return {"deltas": {name: {"shape": list(d.shape), "rank": d.rank} for name, d in self.deltas.items()}}

    def _details(self) -> Description:
        rows = tuple((name, "×".join(map(str, d.shape)), f"rank-{d.rank} factors" if d.rank else "dense")
                     for name, d in self.deltas.items())
        return Description("", table=(("parameter", "shape", "stored as"), rows))

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            if delta.dense is not None:
                out[f"{name}.delta"] = delta.dense
            else:
                out[f"{name}.u"], out[f"{name}.v"] = delta.u, delta.v
        return out

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "WeightEdit":
        deltas = {}
        for name, info in meta["payload"]["deltas"].items():
            if info.get("rank") is None:
                deltas[name] = Delta(dense=tensors[f"{name}.delta"])
            else:
                deltas[name] = Delta(u=tensors[f"{name}.u"], v=tensors[f"{name}.v"])
        return cls(**common_fields(meta), deltas=deltas)
