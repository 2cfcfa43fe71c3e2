"""Context edits: change the conversation (system prompt, demonstrations), never the weights.

How a context edit reads at a strength other than 0 is decided here, from what its `edit.json` holds: at
strength 1 the context stored there (a fit stores its rendering); at other strengths a persona prompt
re-describes the scaled persona (`render_prompt`) and IKE re-draws its demonstrations from the scaled poles
(`render_ike`), from the persona and options; any other context edit uses its stored context.
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

    Strength 0 removes the context. At strength 1 an edit whose method renders its context (`rendered`) uses
    the context its edit.json holds: the system prompt, the demonstrations and, for IKE's topic filter, the
    spares that stand in for a demonstration whose topic the message mentions (`topics`: of the demonstrations,
    then of the spares). Other strengths, and edits saved before the rendering was stored, re-render it from
    the persona and options (prompt intensity, IKE's poles); a context edit without a renderer is used as it is."""

    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = ()
    spares: tuple[tuple[str, str], ...] = ()
    topics: tuple[str, ...] = ()
    rendered: bool = False  # system, demonstrations, spares and topics are the renderer's at strength 1
    kind: ClassVar[str] = "context"

    @classmethod
    def of_rendering(cls, context: Context, **fields: Any) -> "ContextEdit":
        """The edit holding `context`, a renderer's output at strength 1 (its first `k` demonstrations used)."""
        k = len(context.demonstrations) if context.k is None else context.k
        return cls(**fields, system=context.system, demonstrations=context.demonstrations[:k],
                   spares=context.demonstrations[k:], topics=context.topics, rendered=True)

    def context_at(self, strength: float) -> Context | None:
        if strength == 0:
            return None
        renderer = RENDERERS.get(self.method)
        if renderer is not None and self.persona is not None and not (self.rendered and strength == 1):
            return renderer(self.persona, self.options, strength)
        if self.topics:
            return Context(self.system, self.demonstrations + self.spares, self.topics, k=len(self.demonstrations))
        return Context(self.system, self.demonstrations)

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        context = self.context_at(strength)
        if context is None:
            yield
            return
        entry = _ActiveContext(context)
        lm.context_providers.append(entry)
        try:
            yield
        finally:
            lm.context_providers.remove(entry)

    def payload(self) -> dict[str, Any]:
        return {"system": self.system, "demonstrations": [list(d) for d in self.demonstrations],
                "spares": [list(d) for d in self.spares], "topics": list(self.topics), "rendered": self.rendered}

    def _details(self) -> Description:
        system = (f"system prompt: {self.system}",) if self.system else ()
        spares = f" (+{len(self.spares)} spares for messages on their topics)" if self.spares else ""
        return Description("", (*system, f"demonstrations: {len(self.demonstrations)}{spares}"))

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "ContextEdit":
        payload = meta["payload"]

        def turns(key: str) -> tuple[tuple[str, str], ...]:
            return tuple((str(q), str(a)) for q, a in payload.get(key, []))

        demos, spares = turns("demonstrations"), turns("spares")
        topics = tuple(str(t) for t in payload.get("topics", []))
        if topics and len(topics) != len(demos) + len(spares):
            raise ValueError(f"{len(topics)} topics for {len(demos) + len(spares)} demonstrations and spares")
        return cls(**common_fields(meta), system=payload.get("system"), demonstrations=demos, spares=spares,
                   topics=topics, rendered=bool(payload.get("rendered", False)))


@dataclass(eq=False)
class _ActiveContext:
    context: Context

    def context_for(self, prompt: str) -> Context:
        return self.context.for_message(prompt)

