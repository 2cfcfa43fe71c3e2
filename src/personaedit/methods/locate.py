"""What ROME, PALETTE and MEMIT share first: edit requests and where their subject sits.

A request is a prompt template with a `{}` subject slot, a subject ("I") and a target (" facts"). Each
request is read after several prefixes: none (the bare prompt) and short random texts the model wrote
itself (`random_prefixes`); `tokenise_request` splits every prefixed prompt at the first subject token.
The value optimisation on these tokens: value.py; the rank-one update: rank_one.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from personaedit.errors import PersonaEditError
from personaedit.models.forward import encode_prompts, ensure_pad_token
from personaedit.models.loading import LoadedModel

SUBJECT_TOKENS = ("first", "last")
# ROME starts its random prefixes with these words and ends each with ". " before the prompt.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Request:
    """Make the model continue `template` (with `subject` in its `{}` slot) with `target`."""

    template: str
    subject: str
    target: str

    @classmethod
    def of(cls, prompt: str, subject: str, target: str) -> "Request":
        """A request from a template with `{}`, or from a prompt that contains the subject as a word.

        The target gets a leading space when neither it nor the prompt supplies one."""
        if not subject or not subject.strip():
            raise PersonaEditError("the subject is empty; give the word the edit is about, e.g. --subject I")
        if not target or not target.strip():
            raise PersonaEditError("the target is empty; give the word the prompt should be continued with")
        slots = prompt.count("{}")
        if slots > 1:
            raise PersonaEditError(f"the prompt has {slots} '{{}}' subject slots; use exactly one: {prompt!r}")
        if slots == 0:
            found = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt)
            if found is None:
                raise PersonaEditError(f"subject {subject!r} does not occur in the prompt {prompt!r}; "
                                       "put it in the prompt or mark its place with {}")
            prompt = prompt[:found.start()] + "{}" + prompt[found.end():]
        if not target.startswith(" ") and not prompt.endswith(" "):
            target = " " + target
        return cls(prompt, subject, target)

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)


def default_layer(num_layers: int) -> int:
    """The MLP layer PALETTE edits: 15/28 of the depth (its layer for Qwen2.5-1.5B), i.e. just past the middle."""
    return min(num_layers - 1, round(num_layers * 15 / 28))


def check_layer(lm: LoadedModel, layer: int | None) -> int:
    if layer is None:
        return default_layer(lm.arch.num_layers)
    if not 0 <= layer < lm.arch.num_layers:
        raise PersonaEditError(f"layer {layer} out of range: the model has layers 0-{lm.arch.num_layers - 1}")
    return layer


# ------------------------------------------------------------------------------- prefixed tokens

def random_prefixes(lm: LoadedModel, count: int = 10, length: int = 10, seed: int = 0) -> list[str]:
    """`count` short texts the model writes itself (seeded top-k sampling from ROME's start words)."""
    if count <= 0:
        return []
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    batch = encode_prompts(lm, starts, add_special_tokens=True)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = lm.model.generate(**batch, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
                                pad_token_id=ensure_pad_token(lm.tokenizer), temperature=None, top_p=None)
    texts = lm.tokenizer.batch_decode(out, skip_special_tokens=True)
    # Braces would read as template slots; line breaks would break the single-paragraph prompts.
    return [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]


@dataclass(frozen=True)
class RequestTokens:
    """A request read after each prefix: token ids before the first subject token (per prefix), the
    ids from the first subject token on (shared), the subject token offset in those, and the target ids."""

    before: list[list[int]]
    after: list[int]
    subject_index: int
    target: list[int]


def _subject_span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], int, int]:
    """Token ids of `text` and the first and last token overlapping characters [start, end)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PersonaEditError("locating the subject needs a fast tokenizer (with offset mappings)")
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise PersonaEditError(f"the subject of {text!r} maps to no token")
    return ids, hits[0], hits[-1]


def tokenise_request(lm: LoadedModel, request: Request, prefixes: Sequence[str], token: str = "last") -> RequestTokens:
    """Tokenise the request bare and after each prefix, split at the first subject token."""
    if token not in SUBJECT_TOKENS:
        raise PersonaEditError(f"subject token must be 'first' or 'last', not {token!r}")
    slot = request.template.index("{}")
    bare = request.prompt
    ids, first, last = _subject_span(lm.tokenizer, bare, slot, slot + len(request.subject))
    after = ids[first:]
    before = [ids[:first]]
    for prefix in prefixes:
        text = f"{prefix}. {bare}"
        shift = len(prefix) + 2
        ids_after, first_after, _ = _subject_span(lm.tokenizer, text, slot + shift, slot + shift + len(request.subject))
        before.append(ids_after[:first_after])
    if not before[0] and len(before) > 1:
        before = before[1:]  # the bare prompt starts with the subject (no BOS): read it after prefixes only
    target = list(lm.tokenizer(request.target, add_special_tokens=False)["input_ids"])
    if not target:
        raise PersonaEditError(f"target {request.target!r} maps to no token")
    return RequestTokens(before, after, (last - first) if token == "last" else 0, target)


# ------------------------------------------------------------------------------------- keys and values


# ------------------------------------------------------------------------------------------- update


def greedy_continuations(lm: LoadedModel, prompts: Sequence[str], lengths: Sequence[int],
                         batch_size: int = 16) -> list[list[int]]:
    """Greedy token ids continuing each raw-text prompt, `lengths[i]` tokens for prompt i."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(lm, prompts[start:start + batch_size], add_special_tokens=True)
        longest = max(lengths[start:start + batch_size])
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            generated = lm.model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                          pad_token_id=ensure_pad_token(lm.tokenizer), temperature=None, top_p=None, top_k=None)
        for row, n in enumerate(lengths[start:start + batch_size]):
            out.append(generated[row, width:width + n].tolist())
    return out


def efficacy(lm: LoadedModel, requests: Sequence[Request]) -> list[bool]:
    """Per request: is the target the greedy continuation of its prompt?"""
    targets = [list(lm.tokenizer(r.target, add_special_tokens=False)["input_ids"]) for r in requests]
    got = greedy_continuations(lm, [r.prompt for r in requests], [len(t) for t in targets])
    return [g == t for g, t in zip(got, targets)]


