"""Generate for a batch of requests at once, each row with its own edit, sampling settings and stops.

A `RunningBatch` prefills requests (left-padded), then takes one token per step for every row from the KV
cache. Each row stops on an end-of-turn token, a stop string, its `max_tokens`, or its client going away,
and leaves the batch then; new requests can join between steps. Text is handed out as it grows, holding
back what could still become a stop string or an incomplete character.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from personaedit.models.forward import ensure_pad_token, position_ids
from personaedit.models.generation import stop_token_ids
from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.models.loading import LoadedModel
from personaedit.serve import kvrows
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
    outcome: Outcome | None = None  # set when the row leaves the batch


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


class RunningBatch:
    """Rows decoding together, one token per `step`. Requests can join between steps (`admit`: their
    prompts are prefilled on their own, then their cache rows join the batch's) and each row leaves as soon
    as it stops, answering its request then; a row computes the same whoever shares the batch with it."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.decoder = _Decoder(lm)
        self.pad = ensure_pad_token(lm.tokenizer)
        self.cache_arg = cache_argument(lm.model)
        self.joins = kvrows.supports_joining(lm.model)
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cache columns]: 1 on each row's real tokens

    def __len__(self) -> int:
        return len(self.rows)

    def can_admit(self) -> bool:
        """Whether requests can join now (always when idle; while decoding, when the cache allows it)."""
        return not self.rows or self.joins

    def admit(self, requests: Sequence[RowRequest]) -> list[_Row]:
        """Prefill `requests`, take each one's first token, add them to the batch; their rows, in order."""
        rows = [_Row(request, generator=_generator(request, self.lm.device)) for request in requests]
        # Every pass is prefilled and has taken its first tokens before any joins: if one fails, the batch is
        # untouched.
        groups = _similar_lengths(rows) if self.joins else [rows]
        for group, cache, mask in [self._prefill(group) for group in groups]:
            if self.rows:
                self.cache, self.mask = kvrows.join(self.cache, self.mask, cache, mask)
            else:
                self.cache, self.mask = cache, mask
            self.rows += group
        self._leave()
        return rows

    def _prefill(self, rows: Sequence[_Row]):
        """One left-padded forward pass over the prompts of `rows`, which take their first token from it."""
        prompts = [row.request.prompt_ids for row in rows]
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=self.lm.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.lm.device)
        output = self._forward(rows, ids, mask, position_ids(mask), logits_to_keep=1)
        self._advance(rows, output.logits[:, -1, :])
        return rows, cache_of(output), mask

    def step(self) -> None:
        """One new token for every row."""
        tokens = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.lm.device)
        positions = self.mask.sum(1, keepdim=True)  # a row's next position is its count of real tokens so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        output = self._forward(self.rows, tokens, self.mask, positions, **{self.cache_arg: self.cache})
        self.cache = cache_of(output)
        self._advance(self.rows, output.logits[:, -1, :])
        self._leave()

    def _forward(self, rows: Sequence[_Row], ids, mask, positions, **extra):
        # The per-row hooks are installed for each pass: the rows (and so who gets which edit) change.
        with torch.no_grad(), row_edits(self.lm, [row.request.edit for row in rows]):
            return self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)

    def _advance(self, rows: Sequence[_Row], logits: torch.Tensor) -> None:
        """Give each of `rows` its next token from its row of `logits`."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        for index, row in enumerate(rows):
            self.decoder.advance(row, greedy[index] if row.request.greedy else _sample(logits[index], row))

    def _leave(self) -> None:
        """Rows that stopped answer their request and leave the batch and its cache."""
        if all(not row.finish for row in self.rows):
            return
        staying = [i for i, row in enumerate(self.rows) if not row.finish]
        for row in self.rows:
            if row.finish:
                _answer(row)
        if staying:
            self.cache, self.mask = kvrows.keep_rows(self.cache, self.mask, staying)
        else:
            self.cache, self.mask = None, None
        self.rows = [self.rows[i] for i in staying]

    def fail(self, message: str) -> None:
        """Answer every row with `message` as its error and empty the batch."""
        for row in self.rows:
            fail_request(row.request, message)
        self.rows, self.cache, self.mask = [], None, None


def _similar_lengths(rows: Sequence[_Row], spread: float = 1.5) -> list[list[_Row]]:
    """`rows` in groups whose prompt lengths are within `spread` times the group's shortest, to be prefilled
    apart: padding a short prompt to a long one (a context edit's system prompt) costs as much as a real
    token, while one more pass costs little."""
    groups: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: len(r.request.prompt_ids)):
        if groups and len(row.request.prompt_ids) <= spread * len(groups[-1][0].request.prompt_ids):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _generator(request: RowRequest, device) -> torch.Generator | None:
    if request.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
    return generator


def _outcome(row: _Row) -> Outcome:
    return Outcome(row.text, row.finish or "stop", len(row.request.prompt_ids), len(row.tokens), token_ids=row.tokens)


def _answer(row: _Row) -> None:
    row.outcome = _outcome(row)
    if row.request.on_done is not None:
        row.request.on_done(row.outcome)


def fail_request(request: RowRequest, message: str) -> None:
    if request.on_done is not None:
        request.on_done(Outcome("", "stop", len(request.prompt_ids), 0, error=message))


def generate_rows(lm: LoadedModel, requests: Sequence[RowRequest]) -> list[Outcome]:
    """Generate every request in one batch; each row's outcome is also passed to its `on_done` when it stops."""
    batch = RunningBatch(lm)
    rows = batch.admit(requests)
    while batch:
        batch.step()
    return [row.outcome for row in rows]
