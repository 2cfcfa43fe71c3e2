"""Scoring text with a model: the ids of a chat-rendered prompt, and the log-probabilities of answers after
prompts (the standard next-token shift: the logits at position t score token t+1; answer tokens only), and
the next-token probabilities of a few options after many texts that share a prefix (an inventory's answers).

A prompt is rendered exactly as generation renders it (chat template, context edits in force); its ids
and the answer's ids are tokenised separately and concatenated, so the boundary is exact. Batches are
left-padded with explicit position ids, so a padded row scores like the row alone.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Iterable, Sequence

import torch

from personaedit.models.forward import left_pad, position_ids
from personaedit.models.generation import build_messages, render_chat
from personaedit.models.hooks import generated_from
from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.models.loading import LoadedModel
from personaedit.progress import Progress


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")


def token_logits(lm: LoadedModel, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
    """Float32 logits [batch, width, vocab] of left-padded `seqs`; positions >= starts[row] (given in each
    unpadded sequence) count as generated for activation edits."""
    batch = left_pad(lm, seqs)
    width = batch["input_ids"].shape[1]
    padded_starts = torch.tensor([width - len(s) + start for s, start in zip(seqs, starts)], dtype=torch.long)
    with torch.no_grad(), generated_from(padded_starts):
        out = lm.model(**batch, position_ids=position_ids(batch["attention_mask"]))
    return out.logits.float()


def in_batches(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


def prompt_ids(lm: LoadedModel, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the chat-rendered prompt, exactly as generation encodes it."""
    text, uses_template = render_chat(lm.tokenizer, build_messages(lm, prompt, system))
    return list(lm.tokenizer(text, add_special_tokens=not uses_template)["input_ids"])


def _answer_scores(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], pick, *, system: str | None,
                   batch_size: int, on_progress: Progress | None) -> list[torch.Tensor]:
    """For each (prompt, answer): pick(log-softmax rows predicting the answer tokens, answer ids)."""
    _same_length(prompts, answers)
    prompt_part = [prompt_ids(lm, p, system) for p in prompts]
    answer_part = [list(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    if any(not ids for ids in prompt_part):
        raise ValueError("a prompt renders to no tokens; nothing predicts its first answer token")
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_part[i]) + len(answer_part[i]))
    results: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    done = 0
    for chunk in in_batches(order, batch_size):
        seqs = [prompt_part[i] + answer_part[i] for i in chunk]
        last_prompt = [len(prompt_part[i]) - 1 for i in chunk]  # predicts the first answer token
        logits = token_logits(lm, seqs, last_prompt)
        width = logits.shape[1]
        for row, i in enumerate(chunk):
            start = width - len(seqs[row]) + last_prompt[row]
            rows = logits[row, start:start + len(answer_part[i])].log_softmax(-1)
            results[i] = pick(rows, torch.tensor(answer_part[i], dtype=torch.long, device=rows.device)).cpu()
        done += len(chunk)
        if on_progress:
            on_progress(done, len(prompts))
    return results


def answer_logprobs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *, system: str | None = None,
                    batch_size: int = 8, on_progress: Progress | None = None) -> list[torch.Tensor]:
    """Per pair, log p(answer token | chat prompt, earlier answer tokens): a float tensor [n_answer_tokens]."""
    return _answer_scores(lm, prompts, answers, lambda rows, ids: rows.gather(1, ids[:, None]).squeeze(1),
                          system=system, batch_size=batch_size, on_progress=on_progress)


def mean_answer_logprob(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
                        system: str | None = None, batch_size: int = 8,
                        on_progress: Progress | None = None) -> list[float]:
    """Per pair, the mean log-probability per answer token (NaN for an empty answer)."""
    scores = answer_logprobs(lm, prompts, answers, system=system, batch_size=batch_size, on_progress=on_progress)
    return [float(s.mean()) if s.numel() else math.nan for s in scores]


def answer_next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
                               system: str | None = None, batch_size: int = 8,
                               on_progress: Progress | None = None) -> list[torch.Tensor]:
    """Per pair, the full next-token log-distributions at the answer positions: [n_answer_tokens, vocab]."""
    return _answer_scores(lm, prompts, answers, lambda rows, ids: rows, system=system,
                          batch_size=batch_size, on_progress=on_progress)


def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], *, system: str | None = None,
                        batch_size: int = 8) -> torch.Tensor:
    """Next-token log-distribution after each chat prompt (its last position): [n_prompts, vocab]."""
    encoded = [prompt_ids(lm, p, system) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    rows: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for chunk in in_batches(order, batch_size):
        seqs = [encoded[i] for i in chunk]
        logits = token_logits(lm, seqs, [len(s) - 1 for s in seqs])
        for row, i in enumerate(chunk):
            rows[i] = logits[row, -1].log_softmax(-1).cpu()
    return torch.stack(rows) if rows else torch.empty(0)


def option_probabilities(lm: LoadedModel, texts: Sequence[str], option_ids: Sequence[int], *,
                         add_special_tokens: bool, batch_size: int = 16, share_prefix: bool = True,
                         on_progress: Progress | None = None) -> torch.Tensor:
    """[len(texts), len(option_ids)] next-token probabilities (full-vocabulary softmax) of the options
    after each text. One forward pass per text, batched and left-padded; the token prefix all texts share
    (chat template, system prompt, instruction) is run once and its key/value cache reused."""
    tokenizer = lm.tokenizer
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    prefix = _shared_prefix(encoded) if share_prefix else []
    cache = _prefix_cache(lm, prefix) if prefix else None
    if cache is None:
        prefix = []
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    out = torch.zeros(len(texts), len(option_ids))
    wanted = torch.tensor(list(option_ids), device=lm.device)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        logits = _last_logits(lm, [encoded[i][len(prefix):] for i in chunk], cache, len(prefix))
        out[chunk] = logits.float().log_softmax(-1).exp()[:, wanted].cpu()
        if on_progress:
            on_progress(min(start + batch_size, len(order)), len(order))
    return out


def _shared_prefix(encoded: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of all sequences, leaving at least one token of each to run."""
    if not encoded:
        return []
    limit = min(len(e) for e in encoded) - 1
    first = encoded[0]
    n = 0
    while n < limit and all(e[n] == first[n] for e in encoded):
        n += 1
    return list(first[:n])


def _last_logits_only(lm: LoadedModel) -> dict[str, Any]:
    parameters = inspect.signature(lm.model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def _prefix_cache(lm: LoadedModel, prefix: list[int]):
    """The key/value cache of `prefix` (batch 1), or None when the model's cache cannot be shared."""
    ids = torch.tensor([prefix], device=lm.device)
    with torch.no_grad(), generated_from(torch.tensor([len(prefix)])):  # no prefix position is generated
        output = lm.model(input_ids=ids, use_cache=True, **_last_logits_only(lm))
    cache = cache_of(output)
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def _last_logits(lm: LoadedModel, rows: list[list[int]], cache, prefix_len: int) -> torch.Tensor:
    """Logits at the last position of each row (left-padded), continuing the prefix cache if given."""
    batch = left_pad(lm, rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs: dict[str, Any] = {"position_ids": position_ids(mask, prefix_len), **_last_logits_only(lm)}
    if cache is not None:
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(rows))
        ones = torch.ones(len(rows), prefix_len, dtype=mask.dtype, device=lm.device)
        kwargs.update({cache_argument(lm.model): past}, use_cache=True, attention_mask=torch.cat([ones, mask], dim=1))
    else:
        kwargs.update(attention_mask=mask, use_cache=False)
    with torch.no_grad():
        output = lm.model(input_ids=ids, **kwargs)
    return output.logits[:, -1]
