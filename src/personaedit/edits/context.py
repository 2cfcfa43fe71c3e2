"""Context edits: change the conversation (system prompt, demonstrations), never the weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

from personaedit.edits.base import Edit, common_fields
from personaedit.models.generation import Context
from personaedit.models.loading import LoadedModel
from personaedit.persona import Persona

# Methods whose context depends on strength register how to render it: (persona, options, strength) -> Context.
CONTEXT_RENDERERS: dict[str, Callable[[Persona, dict[str, Any], float], Context]] = {}


def context_renderer(method: str):
    def register(fn: Callable[[Persona, dict[str, Any], float], Context]):
        CONTEXT_RENDERERS[method] = fn
        return fn

    return register


@dataclass(frozen=True)
class ContextEdit(Edit):
    """A system prompt and/or demonstration turns placed around every user message.

    Strength 0 removes the context; other strengths re-render it through the method's renderer when
    one is registered (e.g. prompt intensity), else the stored context is used as it is."""

    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = ()
    kind: ClassVar[str] = "context"

    def context_at(self, strength: float) -> Context | None:
        if strength == 0:
            return None
        if self.method not in CONTEXT_RENDERERS:
            from personaedit.methods.registry import all_methods

            all_methods()  # importing the method modules registers their renderers
        renderer = CONTEXT_RENDERERS.get(self.method)
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

