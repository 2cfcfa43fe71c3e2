"""Merge methods: given the task vectors δ_i of one parameter and their weights w_i, the ΔW to add.

A method is a sparsification of each δ_i followed by a way to combine them:
- task_arithmetic: no sparsification; Σ w_i δ_i.
- ties: keep the round(density · n) entries of largest magnitude of each δ_i (trim), elect a sign per
  entry from the sum of the weighted trimmed values, keep only the weighted values that agree with it and
  sum them (or, with `normalize`, average them over the vectors that agree: the TIES disjoint mean).
- dare_linear / dare_ties: drop each entry of each δ_i with probability `drop`, rescale survivors by
  1/(1 − drop), then Σ w_i δ_i / the TIES sign election and disjoint merge (no magnitude trim).

Weights are applied before sign election and normalisation divides by a *count* by default, never by a
sum of weights, so a single vector at weight −1 gives −δ and at 0.5 gives δ/2 whatever the options.
`normalize="weight-sum"` divides by the sum of the agreeing vectors' weights instead, as mergekit does
(`normalize: true` there): for ported mergekit configs. It flips negation (one vector at weight −1 gives
+δ) and undoes scaling (at 0.5 it gives δ); docs/EXPORT.md has the comparison.
Sparsifiers work on consecutive row blocks of a tensor (the engine streams large tensors in blocks);
the result does not depend on the block size.
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
    normalize: bool | str = True  # True / "count": mean over agreeing vectors; False / "none": sum; "weight-sum"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", normalize_mode(self.normalize))


NORMALIZE_MODES = ("count", "weight-sum", "none")


def normalize_mode(value: bool | str) -> bool | str:
    """True (count), False (none) or "weight-sum" from a bool or a mode name."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower().replace("_", "-")
    if text in ("count", "true"):
        return True
    if text in ("none", "false"):
        return False
    if text == "weight-sum":
        return "weight-sum"
    raise PersonaEditError(f"unknown normalize {value!r} (valid: {', '.join(NORMALIZE_MODES)})")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    sparsify: str  # "none" | "magnitude" | "dare"
    combine: str  # "linear" | "disjoint"
    description: str

    @property
    def uses(self) -> tuple[str, ...]:
        """The MergeOptions fields this method reads."""
        own = {"none": (), "magnitude": ("density",), "dare": ("drop", "seed")}[self.sparsify]
        return own + (("normalize",) if self.combine == "disjoint" else ())


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("task_arithmetic", "none", "linear", "Σ w_i δ_i"),
        MergeMethod("ties", "magnitude", "disjoint", "trim to the top density, elect signs, merge the agreeing entries"),
        MergeMethod("dare_linear", "dare", "linear", "DARE drop and rescale, then Σ w_i δ_i"),
        MergeMethod("dare_ties", "dare", "disjoint", "DARE drop and rescale, then TIES sign election and disjoint merge"),
    )
}


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise PersonaEditError(f"unknown merge method {name!r} (valid: {', '.join(MERGE_METHODS)})")
    return MERGE_METHODS[name]


# --- sparsification --------------------------------------------------------------------------------

def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The round(density · n)-th largest of |δ|'s entries: trimming keeps the entries at or above it.
    `magnitudes` is a fresh CPU tensor that this reorders in place (a selection, no copy)."""
    n = magnitudes.numel()
    keep = int(round(density * n))
    if keep >= n:
        return 0.0
    if keep == 0:
        return float("inf")
    values = magnitudes.reshape(-1).numpy()
    values.partition(n - keep)
    return float(values[n - keep])


def trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    return delta * (delta.abs() >= threshold)


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


def sparsifier(method: MergeMethod, options: MergeOptions, vector_index: int, key: str,
               magnitudes: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to do to each consecutive row block of vector `vector_index`'s δ for tensor `key`.
    `magnitudes()` gives |δ| of the whole tensor; only magnitude trimming asks (once, for its threshold)."""
    if method.sparsify == "magnitude" and options.density < 1:
        threshold = magnitude_threshold(magnitudes(), options.density)
        return lambda block: trim(block, threshold)
    if method.sparsify == "dare":
        generator = dare_generator(options.seed, vector_index, key)  # drawn block after block, in order
        return lambda block: dare(block, options.drop, generator)
    return lambda block: block


# --- combination -----------------------------------------------------------------------------------

def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas):
        total.add_(delta, alpha=weight)
    return total


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool | str) -> torch.Tensor:
    """TIES sign election on the weighted values, then their sum, their mean over the agreeing vectors
    (normalize True), or their sum over the agreeing vectors' weight sum (normalize "weight-sum", mergekit's)."""
    mode = normalize_mode(normalize)
    weighted = [w * d for w, d in zip(weights, deltas)]
    elected = torch.sign(sum(weighted[1:], weighted[0].clone()))
    merged = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for weight, value in zip(weights, weighted):
        # Where the elected sign is 0 only zero entries "agree", and they add nothing.
        agree = torch.sign(value) == elected
        merged += value.mul_(agree)
        if mode is True:
            divisor += agree
        elif mode == "weight-sum":
            divisor += weight * agree
    if mode is False:
        return merged
    if mode == "weight-sum":
        return merged / divisor.masked_fill_(divisor == 0, 1.0)  # as mergekit: a zero weight sum divides by 1
    return merged / divisor.clamp_(min=1)


def combine(method: MergeMethod, deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions) -> torch.Tensor:
    if method.combine == "linear":
        return linear_merge(deltas, weights)
    return disjoint_merge(deltas, weights, options.normalize)


def merge_deltas(name: str, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                 options: MergeOptions = MergeOptions(), key: str = "") -> torch.Tensor:
    """The merged ΔW of whole in-memory tensors (the engine does the same block by block)."""
    method = get_merge_method(name)
    sparse = [sparsifier(method, options, i, key, d.abs)(d) for i, d in enumerate(deltas)]
    return combine(method, sparse, weights, options)
