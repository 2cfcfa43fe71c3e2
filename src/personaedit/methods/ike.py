"""IKE (in-context editing): k demonstrations of question -> answer in the target personality, drawn
from the training split, on other topics than the message being answered.

Strength picks the pole (its sign, times each level's sign); demonstrations whose topic the message
mentions are skipped, so a held-out topic never sees its own answer.
"""

from __future__ import annotations

import random
from typing import Any

from personaedit.data import records
from personaedit.edits import ContextEdit, context_renderer
from personaedit.methods.registry import method
from personaedit.models import Context, LoadedModel
from personaedit.persona import Dimension, Persona

OPINION_QUESTION = "What do you think of {}?"


def _pool(dim: Dimension, level: float, seed: int) -> list[tuple[str, str, str]]:
    """(topic, question, answer) candidates in the pole of `level`, training split only, shuffled."""
    pole = dim.pole(level).name
    if dim.kind == "big5":
        rows = records("opinions", "train", trait=dim.name, pole=pole)
        pool = [(r["topic"], OPINION_QUESTION.format(r["topic"]), r["text"]) for r in rows]
    else:
        rows = records("mbti_texts", "train", axis=dim.name, pole=pole)
        questions = [r["question"] for r in records("neutral_questions", "train")]
        pool = [("", questions[i % len(questions)], r["text"]) for i, r in enumerate(rows)]
    random.Random(f"{seed}-{dim.name}-{pole}").shuffle(pool)
    return pool


@context_renderer("ike")
def render_ike(persona: Persona, options: dict[str, Any], strength: float) -> Context:
    """Demonstrations interleaved across the persona's dimensions; spares cover skipped topics."""
    k = int(options.get("k", 4))
    pools = [_pool(dim, level * strength, int(options.get("seed", 0)))
             for dim, (_, level) in zip(persona.dimensions(), persona.levels) if level * strength != 0]
    chosen: list[tuple[str, str, str]] = []
    for i in range(2 * k):  # twice k, so that skipping a mentioned topic still leaves k
        pool = pools[i % len(pools)] if pools else []
        if pool and i // len(pools) < len(pool):
            chosen.append(pool[i // len(pools)])
    return Context(demonstrations=tuple((q, a) for _, q, a in chosen), topics=tuple(t for t, _, _ in chosen), k=k)


@method("ike", family="context")
def fit(lm: LoadedModel, persona: Persona, *, k: int = 4, seed: int = 0) -> ContextEdit:  # noqa: ARG001
    """k demonstrations in the target personality from the training split, on other topics.

    Options:
        k: number of demonstrations placed before each question
        seed: seed of the demonstration draw
    """
    options = {"k": k, "seed": seed}
    context = render_ike(persona, options, 1.0)
    return ContextEdit(method="ike", persona=persona, options=options, demonstrations=context.demonstrations[:k])
