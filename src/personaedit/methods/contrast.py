"""Shared pieces of the activation methods: contrastive prompt pairs, per-dimension fitting, statistics."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from personaedit.data import records
from personaedit.edits import Intervention
from personaedit.errors import PersonaEditError
from personaedit.persona import Dimension, Persona

Prompt = tuple[str | None, str]  # (system, user)

# The user turn of the NPTI and DPN-LE reference code (in our words): a description of a persona, then a
# question the model answers as that persona. Their prompts carry the persona here, not in a system message.
PERSONA_TEMPLATE = (
    "Below is a description of a personality, followed by a question. Set aside who you are and become the "
    "person described, taking on their outlook, tone and attitude, and answer the question as them. Write "
    "naturally and don't overthink it.\n\n###Personality description: {description}\n\n"
    "###Question: {question}\n\n###Response:"
)


@dataclass(frozen=True)
class ContrastivePairs:
    """The same questions asked under a high-pole and a low-pole persona description."""

    dimension: str
    high: list[Prompt]
    low: list[Prompt]
    # The same start of a reply after both prompts of a pair (read there, as repeng reads its dataset), or none.
    openings: list[str] | None = None


def pole_descriptions(dim: Dimension, split: str = "train") -> tuple[list[str], list[str]]:
    """The split's paraphrased descriptions of the high and of the low pole of `dim`."""
    return ([r["text"] for r in records("persona_descriptions", split, dimension=dim.name, pole=dim.high.name)],
            [r["text"] for r in records("persona_descriptions", split, dimension=dim.name, pole=dim.low.name)])


def all_questions(split: str = "train") -> list[str]:
    """The split's situational questions (every trait), then its neutral questions."""
    return ([r["question"] for r in records("situational_questions", split)]
            + [r["question"] for r in records("neutral_questions", split)])


def trait_questions(dim: Dimension, n: int | None = None, *, split: str = "train") -> list[str]:
    """Questions about `dim`'s own trait (the reference codes' trait-specific question sets); with `n`, filled up
    to `n` with the split's other questions. An MBTI axis has no questions of its own: all questions."""
    own = [r["question"] for r in records("situational_questions", split, trait=dim.name)]
    if not own:
        return all_questions(split)[:n]
    if n is None:
        return own
    return (own + [q for q in all_questions(split) if q not in own])[:n]


def as_user_turn(description: str, question: str) -> Prompt:
    """The reference codes' prompt: no system message, persona and question in the user turn."""
    return None, PERSONA_TEMPLATE.format(description=description, question=question)


def seeded_cycle(items: list, n: int, seed: int) -> list:
    """`n` items of `items` in a seeded shuffled order, every distinct one before any repeats."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def contrastive_pairs(dim: Dimension, n: int = 1000, *, split: str = "train", seed: int = 0,
                      questions: list[str] | None = None, user_turn: bool = False) -> ContrastivePairs:
    """`n` pairs (description of the high pole, question) / (description of the low pole, same question).

    Questions are `questions`, by default the split's situational questions (all traits) and neutral questions;
    descriptions are the split's paraphrases of each pole. Distinct combinations are used before any repeats.
    The description goes in the system message, or with `user_turn` into the user turn (`as_user_turn`)."""
    high_texts, low_texts = pole_descriptions(dim, split)
    questions = all_questions(split) if questions is None else questions
    combos = [(q, h, l) for q in questions for h in range(len(high_texts)) for l in range(len(low_texts))]
    chosen = seeded_cycle(combos, n, seed)
    prompt = as_user_turn if user_turn else (lambda description, question: (description, question))
    return ContrastivePairs(
        dim.name,
        high=[prompt(high_texts[h], q) for q, h, _ in chosen],
        low=[prompt(low_texts[l], q) for q, _, l in chosen],
    )


def instruction_pairs(dim: Dimension, n: int, *, split: str = "train", seed: int = 0) -> ContrastivePairs:
    """`n` pairs of a high-pole and a low-pole description alone as the user turn (no question, no system message),
    as repeng's dataset pairs one instruction per pole ("Act as if you're extremely …"); distinct pairings first."""
    high_texts, low_texts = pole_descriptions(dim, split)
    combos = [(h, l) for h in range(len(high_texts)) for l in range(len(low_texts))]
    chosen = seeded_cycle(combos, n, seed)
    return ContrastivePairs(dim.name, high=[(None, high_texts[h]) for h, _ in chosen],
                            low=[(None, low_texts[l]) for _, l in chosen])


def reply_openings(n: int, *, split: str = "train", seed: int = 0, longest: int = 8) -> list[str]:
    """`n` starts of replies: the first 1 … `longest` words of the split's neutral paragraphs, in a seeded order.

    repeng reads its contrast at truncated replies (the same truncation after both personas' instructions); a
    neutral paragraph's first words are such a truncation with nothing of either pole in it."""
    words = [r["text"].split() for r in records("neutral_text", split)]
    openings = sorted({" ".join(w[:k]) for w in words for k in range(1, min(longest, len(w)) + 1)})
    return seeded_cycle(openings, n, seed)


def cohens_d(high: torch.Tensor, low: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-column Cohen's d with the pooled standard deviation (unbiased variances, ε in the root)."""
    n_h, n_l = high.shape[0], low.shape[0]
    pooled = ((n_h - 1) * high.var(0, unbiased=True) + (n_l - 1) * low.var(0, unbiased=True)) / (n_h + n_l - 2)
    return (high.mean(0) - low.mean(0)) / torch.sqrt(pooled + eps)


def probe_accuracy(high: torch.Tensor, low: torch.Tensor) -> float:
    """Held-out accuracy of a mean-difference linear probe (fit on even rows, tested on odd rows)."""
    train_h, test_h, train_l, test_l = high[0::2], high[1::2], low[0::2], low[1::2]
    direction = train_h.mean(0) - train_l.mean(0)
    threshold = (train_h.mean(0) + train_l.mean(0)) @ direction / 2
    correct = (test_h @ direction > threshold).sum() + (test_l @ direction <= threshold).sum()
    return float(correct) / (test_h.shape[0] + test_l.shape[0])


def per_dimension(
    persona: Persona, fit_one: Callable[[Dimension, float], list[Intervention]]
) -> tuple[Intervention, ...]:
    """Interventions for every dimension of the persona (each fitted once, scaled by its signed level)."""
    items: list[Intervention] = []
    for dim, (_, level) in zip(persona.dimensions(), persona.levels):
        if level != 0:
            items += fit_one(dim, level)
    return tuple(items)


def parse_layers(spec: str | int | None, num_layers: int, default: list[int]) -> list[int]:
    """'12', '10-20' or '4,8,12' -> sorted layer indices; None or 'auto' -> `default`."""
    if spec is None or spec == "auto":
        return default
    layers: list[int] = []
    try:
        for part in str(spec).split(","):
            first, _, last = part.strip().partition("-")
            layers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise PersonaEditError(f"bad layers {spec!r}: use 12, 10-20 or 4,8,12") from None
    if not layers or any(not 0 <= layer < num_layers for layer in layers):
        raise PersonaEditError(f"layers {spec!r} out of range: the model has layers 0-{num_layers - 1}")
    return sorted(set(layers))
