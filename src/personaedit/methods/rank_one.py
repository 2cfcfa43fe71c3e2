"""The rank-one update of ROME and PALETTE: ΔW = u vᵀ of one layer's `down_proj` that maps the request's
averaged key k* to its optimised value (r-ROME: the key the update uses is the one the value was read at),
kept as factors (u, v) in the parameter's own layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from personaedit.edits import Delta
from personaedit.methods.locate import Request, tokenise_request
from personaedit.methods.value import ValueOptions, optimise_delta
from personaedit.models.loading import LoadedModel


def rank_one(key: torch.Tensor, delta: torch.Tensor, inverse_moment: torch.Tensor | None = None,
             protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u [out], v [in]) of ΔW = u vᵀ in [out, in] layout with ΔW k* = δ:
    v = C⁻¹k*, u = δ / (k*ᵀ C⁻¹ k*) (C = I without covariance adjustment).

    `protected` ([in, m], earlier keys): v is also made orthogonal to them, so ΔW maps each to 0 and
    leaves what earlier edits made of them as it was. With C, v is the one of least vᵀCv (the smallest mean
    squared response over the statistics' keys) with vᵀk* = 1 and vᵀk_j = 0: v = C⁻¹A (AᵀC⁻¹A)⁻¹e₁ for
    A = [k*, K]; projecting C⁻¹k* off K instead would undo part of the whitening (the earlier keys share
    their mean with k*)."""
    key64 = key.double()
    v = key64 if inverse_moment is None else inverse_moment.to(key64.device) @ key64
    if protected is not None and protected.shape[1]:
        if inverse_moment is None:
            basis, _ = torch.linalg.qr(protected.double().to(v.device))
            v = v - basis @ (basis.T @ v)
        else:
            keys = torch.cat([key64[:, None], protected.double().to(key64.device)], 1)
            whitened = inverse_moment.to(key64.device) @ keys
            first = torch.zeros(keys.shape[1], dtype=torch.float64, device=key64.device)
            first[0] = 1.0
            v = whitened @ torch.linalg.lstsq(keys.T @ whitened, first[:, None]).solution[:, 0]
    u = delta.double() / float(key64 @ v)
    return u.float(), v.float()


def as_delta(lm: LoadedModel, layer: int, u: torch.Tensor, v: torch.Tensor) -> Delta:
    """Factors of ΔW = u vᵀ for layer `layer`'s `down_proj` (u [out, r], v [in, r] for ΔW in [out, in]) in the
    parameter's own layout (GPT-2's Conv1D stores the transpose: the factors swap)."""
    u, v = lm.arch.mlp_out_factors(layer, u.float().cpu().contiguous(), v.float().cpu().contiguous())
    return Delta(u=u, v=v)


@dataclass(frozen=True)
class RankOne:
    """One request's update at one layer: ΔW = u vᵀ ([out], [in]) and how the optimisation went."""

    u: torch.Tensor
    v: torch.Tensor
    key: torch.Tensor
    info: dict[str, float]


def edit_request(lm: LoadedModel, request: Request, layer: int, prefixes: Sequence[str], value_options: ValueOptions,
                 *, inverse_moment: torch.Tensor | None = None, protected: torch.Tensor | None = None) -> RankOne:
    """r-ROME for one request on the model as it is now: averaged key, value optimised at that key's output
    (`protected`: earlier keys the update must leave alone, see `rank_one`)."""
    tokens = tokenise_request(lm, request, prefixes, value_options.subject_token)
    # The mean `down_proj` output over prefixes is W k* + b for the mean key k*: v₀ of the consistent key.
    value = optimise_delta(lm, request, tokens, ("mlp_out", layer), value_options, key_layer=layer)
    u, v = rank_one(value.key, value.delta, inverse_moment, protected)
    return RankOne(u, v, value.key, {**value.info, "delta_norm": float(value.delta.norm()), "value_norm": float(value.reference.norm())})
