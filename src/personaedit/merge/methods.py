"""Per-tensor merge methods: given the task vectors δ_i of one parameter and their weights w_i, the ΔW to add.

- task_arithmetic: Σ w_i δ_i.
- ties: trim each δ_i to its `density` share of largest magnitudes, elect a sign per entry from the sum of
  the weighted trimmed values, keep only the weighted values that agree with it, and sum them (or, with
  `normalize`, average them over the vectors that agree: the TIES disjoint mean).
- dare_linear / dare_ties: drop each entry of each δ_i with probability `drop`, rescale survivors by
  1/(1 − drop), then task arithmetic / TIES sign election and disjoint merge (no magnitude trim).

Weights are applied before sign election and normalisation divides by a *count*, never by a sum of
weights, so a single vector at weight −1 gives −δ and at 0.5 gives δ/2 whatever the options.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from personaedit.errors import PersonaEditError


@dataclass(frozen=True)
class MergeOptions:
    """Every knob a merge method may read; each method names the ones it uses."""

    density: float = 1.0
    drop: float = 0.5
    normalize: bool = True
    seed: int = 0


MergeFn = Callable[[Sequence[torch.Tensor], Sequence[float], MergeOptions, str], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    uses: tuple[str, ...]
    fn: MergeFn
    description: str


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, uses: tuple[str, ...] = ()) -> Callable[[MergeFn], MergeFn]:
    """Register a per-tensor merge function under `name`; `uses` lists the MergeOptions fields it reads."""

    def register(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = MergeMethod(name, uses, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return register


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise PersonaEditError(f"unknown merge method {name!r} (valid: {', '.join(MERGE_METHODS)})")
    return MERGE_METHODS[name]


# --- the pieces ------------------------------------------------------------------------------------

def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density · n) entries of largest magnitude, zero the rest."""
    keep = int(round(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(delta.abs().reshape(-1), keep, sorted=False).indices] = True
    return delta * mask.view_as(delta)


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability `drop` and rescale the survivors by 1/(1 − drop): unbiased."""
    if drop == 0:
        return delta
    return rescale_kept(delta, torch.rand(delta.shape, generator=generator) >= drop, drop)


def rescale_kept(delta: torch.Tensor, keep: torch.Tensor, drop: float) -> torch.Tensor:
    """DARE's survivors scaled by 1/(1 − drop), the dropped entries zero."""
    return (delta * (1.0 / (1.0 - drop))).mul_(keep)


def dare_generator(seed: int, vector_index: int, key: str) -> torch.Generator:
    """A generator per (seed, vector, tensor): the same inputs give the same drops in any order."""
    digest = hashlib.sha256(f"{seed}|{vector_index}|{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES sign election on the weighted values, then their sum (or mean over agreeing vectors)."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    elected = torch.sign(sum(weighted[1:], weighted[0].clone()))
    merged = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for value in weighted:
        # Where the elected sign is 0 only zero entries "agree", and they add nothing.
        agree = torch.sign(value) == elected
        merged += value.mul_(agree)
        if normalize:
            count += agree
    return merged / count.clamp_(min=1) if normalize else merged


# --- the registered methods ------------------------------------------------------------------------

@merge_method("task_arithmetic")
def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions, key: str) -> torch.Tensor:
    """Σ w_i δ_i."""
    total = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas):
        total.add_(delta, alpha=weight)
    return total


@merge_method("ties", uses=("density", "normalize"))
def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions, key: str) -> torch.Tensor:
    """Trim to the top `density`, elect signs, merge the agreeing entries."""
    return disjoint_merge([trim(d, options.density) for d in deltas], weights, options.normalize)


@merge_method("dare_linear", uses=("drop", "seed"))
def dare_linear(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions, key: str) -> torch.Tensor:
    """DARE drop and rescale, then Σ w_i δ_i."""
    dropped = [dare(d, options.drop, dare_generator(options.seed, i, key)) for i, d in enumerate(deltas)]
    return task_arithmetic(dropped, weights, options, key)


@merge_method("dare_ties", uses=("drop", "seed", "normalize"))
def dare_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions, key: str) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint merge."""
    dropped = [dare(d, options.drop, dare_generator(options.seed, i, key)) for i, d in enumerate(deltas)]
    return disjoint_merge(dropped, weights, options.normalize)
