"""Context edits: change the conversation (system prompt, demonstrations), never the weights.

How a context edit reads at a strength other than 0 is decided here, from what its `edit.json` holds
(persona and options): a persona prompt re-describes the scaled persona (`render_prompt`), IKE re-draws
its demonstrations from the scaled poles (`render_ike`); any other context edit uses its stored context.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

from personaedit.data import records
from personaedit.edits.base import Description, Edit, common_fields
from personaedit.models.generation import Context
from personaedit.models.loading import LoadedModel
from personaedit.persona import Dimension, Persona, describe

OPINION_QUESTION = "What do you think of {}?"


def render_prompt(persona: Persona, options: dict[str, Any], strength: float) -> Context:
    """The persona prompt at `strength`: intensity words and adjectives of the scaled levels."""
    return Context(system=describe(persona.scaled(strength), options.get("adjectives")) or None)


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


def render_ike(persona: Persona, options: dict[str, Any], strength: float) -> Context:
    """IKE's demonstrations at `strength`, interleaved across the persona's dimensions; spares cover skipped topics."""
    k = int(options.get("k", 4))
    pools = [_pool(dim, level * strength, int(options.get("seed", 0)))
             for dim, (_, level) in zip(persona.dimensions(), persona.levels) if level * strength != 0]
    chosen: list[tuple[str, str, str]] = []
    for i in range(2 * k):  # twice k, so that skipping a mentioned topic still leaves k
        pool = pools[i % len(pools)] if pools else []
        if pool and i // len(pools) < len(pool):
            chosen.append(pool[i // len(pools)])
    return Context(demonstrations=tuple((q, a) for _, q, a in chosen), topics=tuple(t for t, _, _ in chosen), k=k)


# Context edits whose context depends on strength, by the method that made them: (persona, options, strength) -> Context.
RENDERERS: dict[str, Callable[[Persona, dict[str, Any], float], Context]] = {"prompt": render_prompt, "ike": render_ike}


@dataclass(frozen=True)
class ContextEdit(Edit):
    """A system prompt and/or demonstration turns placed around every user message.

    Strength 0 removes the context; other strengths re-render it through its method's renderer when
    it has one (prompt intensity, IKE's poles), else the stored context is used as it is."""

    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = ()
    kind: ClassVar[str] = "context"

    def context_at(self, strength: float) -> Context | None:
        if strength == 0:
            return None
        renderer = RENDERERS.get(self.method)
        if renderer is not None and self.persona is not None:
            return renderer(self.persona, self.options, strength)
        return Context(self.system, self.demonstrations)

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        context = self.context_at(strength)
        if context is None:
            yield
            return
        entry = _ActiveContext(context)
        lm.contexts.append(entry)
        try:
            yield
        finally:
            lm.contexts.remove(entry)

    def payload(self) -> dict[str, Any]:
        return {"system": self.system, "demonstrations": [list(d) for d in self.demonstrations]}

    def _details(self) -> Description:
        system = (f"system prompt: {self.system}",) if self.system else ()
        return Description("", (*system, f"demonstrations: {len(self.demonstrations)}"))

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "ContextEdit":
        payload = meta["payload"]
        demos = tuple((str(q), str(a)) for q, a in payload.get("demonstrations", []))
        return cls(**common_fields(meta), system=payload.get("system"), demonstrations=demos)


@dataclass(eq=False)
class _ActiveContext:
    context: Context

    def context_for(self, prompt: str) -> Context:
        return self.context.for_message(prompt)

