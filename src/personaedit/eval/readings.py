"""Per-item readings of a model that the effect protocol pairs between the base and the edited model.

- `margin_items` / `text_logprobs`: held-out texts written in one pole of a dimension, each as a reply to a
  prompt, and the model's mean log-probability per token of each. Their signed change between the base and
  the edited model is the log-probability margin: a low-noise reading of a trait shift that needs no generation.
- `reply_perplexities`: how plausible the *base* model finds each reply (nonsense scores thousands; fluent
  replies single digits), the coherence reading that n-gram entropy misses.
- `capability_correct`: multiple-choice items scored by the options' log-probabilities, arithmetic word
  problems by exact match of the first number in a greedy reply (capability retention).

Nothing here is fitted: every text comes from a test split or from the independent judge check set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from personaedit.data import records
from personaedit.models import LoadedModel, generate
from personaedit.persona import BIG_FIVE, MBTI
from personaedit.progress import Progress


# A reply the base model finds less plausible than this (perplexity per token) reads as nonsense.
PLAUSIBLE_PERPLEXITY = 50.0


@dataclass(frozen=True)
class MarginItem:
    dimension: str
    pole: float  # +1 high pole / first letter, -1 the other
    prompt: str
    text: str


def margin_items(dimensions: Sequence[str]) -> list[MarginItem]:
    """Held-out pole texts for each of `dimensions`: the judge check set (replies to a chat message), the test
    split of the topic-paired opinions (replies to 'What do you think about TOPIC?') and of the MBTI texts."""
    items: list[MarginItem] = []
    for dim in dimensions:
        first = MBTI[dim].high.name if dim in MBTI else "high"
        for row in records("judge_check", trait=dim):
            items.append(MarginItem(dim, 1.0 if row["pole"] == first else -1.0, row["context"], row["text"]))
        if dim in BIG_FIVE:
            for row in records("opinions", "test", trait=dim):
                items.append(MarginItem(dim, 1.0 if row["pole"] == "high" else -1.0,
                                        f"What do you think about {row['topic']}?", row["text"]))
        else:
            for row in records("mbti_texts", "test", axis=dim):
                items.append(MarginItem(dim, 1.0 if row["pole"] == first else -1.0, "Tell me about yourself.",
                                        row["text"]))
    return items


def text_logprobs(lm: LoadedModel, items: Sequence[MarginItem], on_progress: Progress | None = None) -> list[float]:
    """Mean log-probability per token of each item's text as the reply to its prompt."""
    from personaedit.models.scoring import mean_answer_logprob

    if not items:
        return []
    return mean_answer_logprob(lm, [i.prompt for i in items], [i.text for i in items], on_progress=on_progress)


def reply_perplexities(lm: LoadedModel, prompts: Sequence[str], replies: Sequence[str],
                       on_progress: Progress | None = None) -> list[float]:
    """exp(−mean log-probability per token) of each reply under `lm` (call it on the base model); NaN when empty."""
    from personaedit.models.scoring import mean_answer_logprob

    means = mean_answer_logprob(lm, list(prompts), [r if r.strip() else "" for r in replies], on_progress=on_progress)
    return [math.exp(-m) if not math.isnan(m) else math.nan for m in means]


def plausible(perplexity: float, limit: float = PLAUSIBLE_PERPLEXITY) -> bool:
    return not math.isnan(perplexity) and perplexity <= limit


def capability_items(split: str = "test", limit: int | None = None) -> list[dict]:
    """Multiple-choice and arithmetic items, alternating kinds so a limit keeps both."""
    choice = records("capability_items", split, kind="choice")
    arithmetic = records("capability_items", split, kind="arithmetic")
    mixed = [row for pair in zip(choice, arithmetic) for row in pair]
    mixed += choice[len(arithmetic):] + arithmetic[len(choice):]
    return mixed[:limit] if limit is not None else mixed


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def capability_correct(lm: LoadedModel, items: Sequence[dict], *, max_new_tokens: int = 24,
                       on_progress: Progress | None = None) -> list[float]:
    """1.0 / 0.0 per item: the option with the highest mean log-probability per token is the key (choice), or the
    first number of the greedy reply equals the answer (arithmetic)."""
    from personaedit.models.scoring import mean_answer_logprob

    correct: list[float] = [0.0] * len(items)
    choice = [(i, row) for i, row in enumerate(items) if row["kind"] == "choice"]
    if choice:
        prompts = [f"{row['question']}\nAnswer with the correct option." for _, row in choice for _ in row["options"]]
        answers = [option for _, row in choice for option in row["options"]]
        scores = mean_answer_logprob(lm, prompts, answers)
        at = 0
        for i, row in choice:
            options = scores[at:at + len(row["options"])]
            at += len(row["options"])
            correct[i] = float(max(range(len(options)), key=lambda k: options[k]) == row["answer"])
    arithmetic = [(i, row) for i, row in enumerate(items) if row["kind"] == "arithmetic"]
    if arithmetic:
        replies = generate(lm, [f"{row['question']} Answer with the number only." for _, row in arithmetic],
                           max_new_tokens=max_new_tokens)
        for (i, row), reply in zip(arithmetic, replies):
            number = first_number(reply)
            correct[i] = float(number is not None and abs(number - float(row["answer"])) < 1e-9)
    if on_progress:
        on_progress(len(items), len(items))
    return correct
