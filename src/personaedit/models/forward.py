"""One forward-pass layer: how personaedit builds a batch for a model and runs it.

- `left_pad` / `encode_prompts`: token rows or texts -> a left-padded batch (input ids and attention
  mask) on the model's device; `position_ids` numbers each row's real tokens from 0, which models with
  absolute position embeddings (GPT-2) need under left padding.
- `ensure_pad_token`: the pad token of a tokenizer that has none (its EOS).
- `run_until`: a forward pass that stops once a layer has run, for hooks that only read below it.
- `frozen`: parameters need no gradients within a block; their flags come back afterwards.
Hooks at named activation sites live in `models/hooks.py`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from personaedit.models.loading import LoadedModel


def ensure_pad_token(tokenizer) -> int:
    """Base models often have no pad token; padding with EOS is harmless under an attention mask."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def left_pad(lm: LoadedModel, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [len(rows), longest] on the model's device, padded on the left so
    that every row's last token is at the last position."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), ensure_pad_token(lm.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[index, width - len(row):] = 1
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}


def encode_prompts(lm: LoadedModel, texts: Sequence[str], add_special_tokens: bool) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompt texts on the model's device."""
    encoded = lm.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    return left_pad(lm, encoded)


def position_ids(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that start at `offset` on each row's first real token (left padding shifts them otherwise,
    which matters for models with absolute position embeddings such as GPT-2)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset


class _Stop(Exception):
    """Raised after the last layer a pass needs."""


def _raise_stop(_module, _args, _output):
    raise _Stop


def run_until(lm: LoadedModel, layer: int, **inputs: Any) -> None:
    """Run the model on `inputs` (no gradients, no cache) and stop as soon as layer `layer` has run: hooks at
    or below it have seen the whole batch; the upper layers and the vocabulary projection are skipped."""
    handle = lm.arch.layer(layer).register_forward_hook(_raise_stop)
    try:
        with torch.no_grad():
            lm.model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Within the block the model's parameters need no gradients; their flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
