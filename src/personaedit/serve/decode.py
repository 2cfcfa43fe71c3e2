"""Generate for a batch of requests at once, each row with its own edit, sampling settings and stops.

One left-padded prefill, then one token per step for every row from the KV cache, until each row has
stopped (an end-of-turn token, a stop string, its `max_tokens`, or its client went away). Text is handed
out as it grows, holding back what could still become a stop string or an incomplete character.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from personaedit.models.generation import ensure_pad_token, position_ids, stop_token_ids
from personaedit.models.loading import LoadedModel
from personaedit.serve.rowwise import PreparedEdit, row_edits


@dataclass
class Outcome:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class RowRequest:
    """One sequence to generate. `temperature` None or 0 means greedy."""

    prompt_ids: list[int]
    max_tokens: int
    edit: tuple[PreparedEdit, float] | None = None
    temperature: float | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_delta: Callable[[str], None] | None = None
    on_done: Callable[[Outcome], None] | None = None
    cancelled: bool = False  # set from another thread when the client has gone

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass
class _Row:
    request: RowRequest
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    text: str = ""
    finish: str | None = None
    generator: torch.Generator | None = None


def _cache_argument(model) -> str:
    """transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still be the start of a stop string or of a split character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold


def _sample(logits: torch.Tensor, row: _Row) -> int:
    probs = torch.softmax(logits / float(row.request.temperature), dim=-1)
    if row.request.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > row.request.top_p  # keep the smallest set reaching top_p
        ordered[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=row.generator))


class _Decoder:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.stop_ids = set(stop_token_ids(lm))

    def advance(self, row: _Row, token: int) -> None:
        """Record one new token: update the text, decide whether the row stops, hand out new text."""
        request = row.request
        row.tokens.append(token)
        if token in self.stop_ids:
            row.finish = "stop"
        else:
            # Replies are stripped at the start, as `generate` strips them.
            row.text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()
            hits = [row.text.find(s) for s in request.stop if s and s in row.text]
            if hits:
                row.text, row.finish = row.text[:min(hits)], "stop"
            elif len(row.tokens) >= request.max_tokens:
                row.finish = "length"
        if request.cancelled and row.finish is None:
            row.finish = "stop"
        ready = len(row.text) if row.finish else len(row.text) - _held_back(row.text, request.stop)
        if ready > row.emitted and request.on_delta is not None:
            request.on_delta(row.text[row.emitted:ready])
        row.emitted = max(row.emitted, ready)


def generate_rows(lm: LoadedModel, requests: Sequence[RowRequest]) -> list[Outcome]:
    """Generate every request in one batch; each row's outcome is also passed to its `on_done`."""
    decoder = _Decoder(lm)
    device = lm.device
    rows = [_Row(r) for r in requests]
    for row in rows:
        if not row.request.greedy:
            row.generator = torch.Generator(device=device)
            row.generator.manual_seed(row.request.seed if row.request.seed is not None else random.getrandbits(63))
    pad = ensure_pad_token(lm.tokenizer)
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in requests], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests], device=device)
    positions = position_ids(mask)
    cache_arg = _cache_argument(lm.model)
    with torch.no_grad(), row_edits(lm, [r.edit for r in requests]):
        output = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        while True:
            logits = output.logits[:, -1, :].float()
            greedy = logits.argmax(-1).tolist()
            step = []
            for index, row in enumerate(rows):
                token = pad if row.finish else greedy[index] if row.request.greedy else _sample(logits[index], row)
                if not row.finish:
                    decoder.advance(row, token)
                step.append(token)
            if all(row.finish for row in rows):
                break
            cache = output.cache if hasattr(output, "cache") else output.past_key_values
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            output = lm.model(input_ids=torch.tensor(step, device=device).unsqueeze(1), attention_mask=mask,
                              position_ids=positions, use_cache=True, **{cache_arg: cache})
    outcomes = [Outcome(row.text, row.finish or "stop", len(row.request.prompt_ids), len(row.tokens), token_ids=row.tokens)
                for row in rows]
    for row, outcome in zip(rows, outcomes):
        if row.request.on_done is not None:
            row.request.on_done(outcome)
    return outcomes
