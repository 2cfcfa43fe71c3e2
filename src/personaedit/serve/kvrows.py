"""Rows in and out of a running batch's KV cache: the one place that reshapes the cache.

A running batch is its KV cache (per layer, keys and values of shape [batch, heads, seq, head_dim]) and an
attention mask [batch, seq] saying which of those columns are a row's real tokens (the rest is left padding).
Rows that finish leave (`keep_rows`); rows prefilled on their own join (`join`): the shorter of the two
caches is left-padded with masked columns, then the two are concatenated along the batch. Masked columns
get zero attention weight, so a row computes the same whatever padding sits to its left.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from transformers.cache_utils import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56 keeps lists of tensors instead of layers: rows can leave, not join
    DynamicLayer = None


def joinable(cache: Any) -> bool:
    """Whether rows can join this cache: every layer keeps all its columns. A sliding-window layer drops old
    columns and counts positions itself, so padding it on the left would shift what it keeps."""
    layers = getattr(cache, "layers", None)
    return DynamicLayer is not None and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def supports_joining(model: Any) -> bool:
    """Whether the caches `model` makes are `joinable` (judged on the empty cache it would start from)."""
    try:
        return joinable(DynamicCache(config=model.config))
    except TypeError:  # transformers < 4.56: no per-layer caches
        return False


def _left_pad(cache: Any, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Widen `cache` (in place) and `mask` to `width` columns with masked columns on the left."""
    extra = width - mask.shape[1]
    if extra:
        for layer in cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))
    return F.pad(mask, (extra, 0))


def join(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The rows of `cache` followed by those of `new_cache` in one cache (`cache` is reused), with their mask.
    Both must be `joinable`."""
    width = max(mask.shape[1], new_mask.shape[1])
    mask, new_mask = _left_pad(cache, mask, width), _left_pad(new_cache, new_mask, width)
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([layer.keys, new.keys])
        layer.values = torch.cat([layer.values, new.values])
    return cache, torch.cat([mask, new_mask])


def keep_rows(cache: Any, mask: torch.Tensor, rows: Sequence[int]) -> tuple[Any, torch.Tensor]:
    """Only `rows` of the batch, in that order; columns that are padding on every kept row are dropped too,
    so a long row that left costs the others nothing."""
    index = torch.tensor(list(rows), dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    if joinable(cache):
        first = int(mask.any(0).long().argmax()) if mask.numel() else 0  # first column some row still uses
        if first:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            mask = mask[:, first:]
    return cache, mask
