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
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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


# --- work buffers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Buffers:
    """Scratch space of one block for the in-place forms below, each of the block's shape: `values` in the
    work dtype (|δ|, signs, or the float32 uniform draws of DARE in its first bytes), `mask` bool, and for
    a disjoint merge `elected` and `divisor` in the work dtype. The streaming engine makes them views of
    buffers it allocates once per merge, so the heap does not grow with the number of tensors."""

    values: torch.Tensor
    mask: torch.Tensor
    elected: Optional[torch.Tensor] = None
    divisor: Optional[torch.Tensor] = None

    @classmethod
    def like(cls, block: torch.Tensor, divisor: bool = False) -> "Buffers":
        """Fresh buffers for a block like `block`."""
        return cls(torch.empty_like(block), torch.empty(block.shape, dtype=torch.bool),
                   torch.empty_like(block) if divisor else None, torch.empty_like(block) if divisor else None)

    def float32(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of `shape` in the first bytes of `values` (as large or larger: float32 or float64)."""
        return self.values.reshape(-1).view(torch.uint8)[:math.prod(shape) * 4].view(torch.float32).view(shape)


# --- sparsification --------------------------------------------------------------------------------

def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The round(density · n)-th largest of |δ|'s entries: trimming keeps the entries at or above it.
    `magnitudes` is a CPU tensor of its own that this reorders in place (a selection, no copy)."""
    n = magnitudes.numel()
    keep = int(round(density * n))
    if keep >= n:
        return 0.0
    if keep == 0:
        return float("inf")
    values = magnitudes.reshape(-1).numpy()
    values.partition(n - keep)
    return float(values[n - keep])


def trim(delta: torch.Tensor, threshold: float, scratch: Optional[Buffers] = None) -> torch.Tensor:
    """δ with the entries of magnitude below `threshold` zeroed: in fresh memory, or with `scratch` in place
    (δ itself, working in the scratch's buffers)."""
    if scratch is None:
        delta, scratch = delta.clone(), Buffers.like(delta)
    return delta.mul_(torch.ge(torch.abs(delta, out=scratch.values), threshold, out=scratch.mask))


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator, scratch: Optional[Buffers] = None) -> torch.Tensor:
    """Drop each entry with probability `drop` and rescale the survivors by 1/(1 − drop): unbiased. In fresh
    memory, or with `scratch` in place (δ itself; the uniform draws are float32 whatever δ's dtype)."""
    if drop == 0:
        return delta
    if scratch is None:
        delta, scratch = delta.clone(), Buffers.like(delta)
    draws = torch.rand(delta.shape, generator=generator, out=scratch.float32(delta.shape))
    return rescale_kept(delta, torch.ge(draws, drop, out=scratch.mask), drop, in_place=True)


def rescale_kept(delta: torch.Tensor, keep: torch.Tensor, drop: float, in_place: bool = False) -> torch.Tensor:
    """DARE's survivors scaled by 1/(1 − drop), the dropped entries zero (in δ itself with `in_place`)."""
    return (delta if in_place else delta.clone()).mul_(1.0 / (1.0 - drop)).mul_(keep)


def dare_generator(seed: int, vector_index: int, key: str) -> torch.Generator:
    """A generator per (seed, vector, tensor): the same inputs give the same drops in any order."""
    digest = hashlib.sha256(f"{seed}|{vector_index}|{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sparsifier(method: MergeMethod, options: MergeOptions, vector_index: int, key: str,
               magnitudes: Callable[[], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """What to do to each consecutive row block of vector `vector_index`'s δ for tensor `key`: called as
    f(block) (fresh memory) or f(block, scratch) (in place in the block, working in `scratch`).
    `magnitudes()` gives |δ| of the whole tensor; only magnitude trimming asks (once, for its threshold)."""
    if method.sparsify == "magnitude" and options.density < 1:
        threshold = magnitude_threshold(magnitudes(), options.density)
        return lambda block, scratch=None: trim(block, threshold, scratch)
    if method.sparsify == "dare":
        generator = dare_generator(options.seed, vector_index, key)  # drawn block after block, in order
        return lambda block, scratch=None: dare(block, options.drop, generator, scratch)
    return lambda block, scratch=None: block


# --- combination -----------------------------------------------------------------------------------

def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ w_i δ_i, in fresh memory or in `out`."""
    total = torch.zeros_like(deltas[0]) if out is None else out.zero_()
    for weight, delta in zip(weights, deltas):
        total.add_(delta, alpha=weight)
    return total


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool | str,
                   out: Optional[torch.Tensor] = None, scratch: Optional[Buffers] = None) -> torch.Tensor:
    """TIES sign election on the weighted values, then their sum, their mean over the agreeing vectors
    (normalize True), or their sum over the agreeing vectors' weight sum (normalize "weight-sum", mergekit's).
    Without `out` in fresh memory, the deltas left as they are; with `out` and `scratch` the deltas are
    weighted and masked in place and the work happens in those buffers (the engine's reused blocks)."""
    mode = normalize_mode(normalize)
    if out is None or scratch is None:
        deltas, out, scratch = [d.clone() for d in deltas], torch.empty_like(deltas[0]), Buffers.like(deltas[0], divisor=True)
    weighted = [d.mul_(w) for w, d in zip(weights, deltas)]
    elected = scratch.elected.copy_(weighted[0])
    for value in weighted[1:]:
        elected.add_(value)
    elected.sign_()
    merged = out.zero_()
    divisor = scratch.divisor.zero_() if mode is not False else None
    for weight, value in zip(weights, weighted):
        # Where the elected sign is 0 only zero entries "agree", and they add nothing.
        agree = torch.eq(torch.sign(value, out=scratch.values), elected, out=scratch.mask)
        merged.add_(value.mul_(agree))
        if mode is True:
            divisor.add_(agree)
        elif mode == "weight-sum":
            # weight · agree is float32 (torch's default dtype) whatever the deltas' dtype, as it always was
            divisor.add_(torch.mul(agree, weight, out=scratch.float32(agree.shape)))
    if mode is False:
        return merged
    if mode == "weight-sum":
        # as mergekit: a zero weight sum divides by 1
        return merged.div_(divisor.masked_fill_(torch.eq(divisor, 0, out=scratch.mask), 1.0))
    return merged.div_(divisor.clamp_(min=1))


def combine(method: MergeMethod, deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MergeOptions,
            out: Optional[torch.Tensor] = None, scratch: Optional[Buffers] = None) -> torch.Tensor:
    """The merged ΔW of one block: in fresh memory, or in `out` (then a disjoint merge needs `scratch` and
    changes the deltas in place)."""
    if method.combine == "linear":
        return linear_merge(deltas, weights, out)
    return disjoint_merge(deltas, weights, options.normalize, out, scratch)


def merge_deltas(name: str, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                 options: MergeOptions = MergeOptions(), key: str = "") -> torch.Tensor:
    """The merged ΔW of whole in-memory tensors (the engine does the same block by block)."""
    method = get_merge_method(name)
    sparse = [sparsifier(method, options, i, key, d.abs)(d) for i, d in enumerate(deltas)]
    return combine(method, sparse, weights, options)
