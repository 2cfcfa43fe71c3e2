"""Scoring text with a model: the ids of a chat-rendered prompt, and the log-probabilities of answers after
prompts (the standard next-token shift: the logits at position t score token t+1; answer tokens only).

A prompt is rendered exactly as generation renders it (chat template, context edits in force); its ids
and the answer's ids are tokenised separately and concatenated, so the boundary is exact. Batches are
left-padded with explicit position ids, so a padded row scores like the row alone.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from personaedit.models.forward import left_pad, position_ids
from personaedit.models.generation import build_messages, render_chat
from personaedit.models.hooks import generated_from
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
