"""Uncentred second moments C = E[k kᵀ] of `down_proj` inputs over a local neutral corpus (MEMIT's
statistics; ROME's optional covariance adjustment). Computed in batches, in float64, and cached per
(model fingerprint, layer, sample count) with atomic writes.

The corpus is the package's train-split text, neutral first: `neutral_text` paragraphs, then neutral and
situational questions, then `opinions` (first-person opinions on everyday topics). A sample is one token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.fileio import atomic_path
from personaedit.models.hooks import hook_site
from personaedit.models.loading import LoadedModel, cache_dir

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


class _Stop(Exception):
    pass


def _stop(_module, _args, _output):
    raise _Stop


def second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    samples: int = 20000,
    *,
    batch_size: int = 8,
    use_cache: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
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

    handles = [hook_site(lm.arch, "mlp_hidden", layer, accumulate(layer)) for layer in missing]
    handles.append(lm.arch.layer(max(missing)).register_forward_hook(_stop))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                if state["count"] >= samples:
                    break
                batch = encoded[start:start + batch_size]
                lengths = []
                for ids in batch:  # the last batch is cut so that exactly `samples` tokens count
                    lengths.append(min(len(ids), samples - state["count"] - sum(lengths)))
                batch = [ids[:n] for ids, n in zip(batch, lengths) if n > 0]
                widest = max(len(ids) for ids in batch)
                ids = torch.full((len(batch), widest), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), widest), dtype=torch.bool)
                for row, seq in enumerate(batch):  # right padding: positions need no shifting
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = True
                state["mask"] = mask.to(lm.device)
                try:
                    lm.model(input_ids=ids.to(lm.device), attention_mask=mask.long().to(lm.device), use_cache=False)
                except _Stop:
                    pass
                state["count"] += int(mask.sum())
                if on_progress:
                    on_progress(state["count"], samples)
    finally:
        for handle in handles:
            handle.remove()
    for layer in missing:
        moment = sums[layer] / state["count"]
        result[layer] = moment
        if use_cache:
            with atomic_path(cache_path(lm, layer, samples)) as tmp:
                save_file({"moment": moment.contiguous()}, str(tmp), metadata={"samples": str(state["count"])})
    return result


def regularised_inverse(moment: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """(C + ridge·mean(diag C)·I)⁻¹ in float64: C from a few thousand tokens can be singular."""
    eye = torch.eye(moment.shape[0], dtype=torch.float64)
    shift = ridge * float(moment.diagonal().mean())
    return torch.linalg.inv(moment.double() + shift * eye)
