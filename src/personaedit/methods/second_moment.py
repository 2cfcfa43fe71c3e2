"""Uncentred second moments C = E[k kᵀ] of `down_proj` inputs over a local neutral corpus (MEMIT's
statistics; ROME's optional covariance adjustment). Computed in batches, in float64, and cached per
(model fingerprint, layer, sample count) with atomic writes.

The corpus is the package's train-split text, neutral first: `neutral_text` paragraphs, then neutral and
situational questions, then `opinions` (first-person opinions on everyday topics). A sample is one token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.fileio import atomic_path
from personaedit.models.forward import left_pad, position_ids, run_until
from personaedit.models.hooks import hooked
from personaedit.models.loading import LoadedModel, cache_dir
from personaedit.progress import Progress

MAX_TOKENS_PER_TEXT = 256


def corpus() -> list[str]:
    """The statistics corpus in its fixed order (train splits only)."""
    texts = [r["text"] for r in records("neutral_text", "train")]
    texts += [r["question"] for r in records("neutral_questions", "train")]
    texts += [r["question"] for r in records("situational_questions", "train")]
    texts += [r["text"] for r in records("opinions", "train")]
    return texts


def cache_path(lm: LoadedModel, layer: int, samples: int):
    return cache_dir() / "second_moment" / f"{lm.fingerprint}-layer{layer}-n{samples}.safetensors"


def second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    samples: int = 20000,
    *,
    batch_size: int = 8,
    use_cache: bool = True,
    on_progress: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """C for each layer's `down_proj` input from the first `samples` corpus tokens: float64 [mlp_size, mlp_size]."""
    if samples < 1:
        raise PersonaEditError(f"samples must be >= 1, got {samples}")
    layers = sorted(set(layers))
    result: dict[int, torch.Tensor] = {}
    if use_cache:
        for layer in layers:
            path = cache_path(lm, layer, samples)
            if path.is_file():
                result[layer] = load_file(str(path))["moment"]
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result

    tokenizer = lm.tokenizer
    encoded = [list(ids)[:MAX_TOKENS_PER_TEXT] for ids in tokenizer(corpus())["input_ids"]]
    available = sum(len(ids) for ids in encoded)
    if samples > available:
        raise PersonaEditError(f"the statistics corpus has {available} tokens for this tokenizer; ask for at most that many samples")
    width = lm.arch.mlp_size
    sums = {layer: torch.zeros(width, width, dtype=torch.float64) for layer in missing}
    state = {"mask": None, "count": 0}

    def accumulate(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            keys = hidden[state["mask"]].to("cpu", torch.float64)  # [real tokens, width]
            sums[layer].addmm_(keys.T, keys)
        return fn

    with hooked(lm.arch, [("mlp_hidden", layer, accumulate(layer)) for layer in missing]):
        for start in range(0, len(encoded), batch_size):
            if state["count"] >= samples:
                break
            rows = encoded[start:start + batch_size]
            lengths = []
            for ids in rows:  # the last batch is cut so that exactly `samples` tokens count
                lengths.append(min(len(ids), samples - state["count"] - sum(lengths)))
            batch = left_pad(lm, [ids[:n] for ids, n in zip(rows, lengths) if n > 0])
            state["mask"] = batch["attention_mask"].bool()
            run_until(lm, max(missing), **batch, position_ids=position_ids(batch["attention_mask"]))
            state["count"] += int(state["mask"].sum())
            if on_progress:
                on_progress(state["count"], samples)
    for layer in missing:
        moment = sums[layer] / state["count"]
        result[layer] = moment
        if use_cache:
            with atomic_path(cache_path(lm, layer, samples)) as tmp:
                save_file({"moment": moment.contiguous()}, str(tmp), metadata={"samples": str(state["count"])})
    return result


def inverse_second_moment(lm: LoadedModel, layer: int, samples: int = 20000) -> torch.Tensor:
    """`regularised_inverse` of layer `layer`'s `down_proj` input second moment (ROME's covariance adjustment)."""
    return regularised_inverse(second_moments(lm, [layer], samples)[layer])


def regularised_inverse(moment: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """(C + ridge·mean(diag C)·I)⁻¹ in float64: C from a few thousand tokens can be singular."""
    eye = torch.eye(moment.shape[0], dtype=torch.float64)
    shift = ridge * float(moment.diagonal().mean())
    return torch.linalg.inv(moment.double() + shift * eye)
