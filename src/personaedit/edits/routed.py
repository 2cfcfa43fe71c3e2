"""Routed context edits (SERAC's shape): an edit memory of descriptors (topic, target personality) and a scope
classifier. A message the classifier puts inside a stored topic's scope is answered under that descriptor's
counterfactual context (the persona prompt for the topic); any other message passes through untouched, so
out of scope the base model answers exactly as it would without the edit.

The scope classifier is the cosine similarity of sentence embeddings of the message and each stored topic,
against a threshold; encoders are looked up by name in `SCOPE_ENCODERS` (the real one: MiniLM, the text
judge's encoder) and the topic embeddings are saved with the edit.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch

from personaedit.edits.base import Edit, common_fields
from personaedit.errors import EditError
from personaedit.models.generation import Context
from personaedit.models.loading import LoadedModel
from personaedit.persona import Persona, describe

Encoder = Callable[[Sequence[str]], np.ndarray]  # texts -> unit-norm embeddings [n, d]


@functools.lru_cache(maxsize=1)
def _minilm() -> Encoder:
    from personaedit.models.encoders import SentenceEncoder

    return SentenceEncoder().encode


# name -> a function returning the encoder (loaded once); tests register small stand-ins here.
SCOPE_ENCODERS: dict[str, Callable[[], Encoder]] = {"minilm": _minilm}


def scope_encoder(name: str) -> Encoder:
    if name not in SCOPE_ENCODERS:
        raise EditError(f"unknown scope encoder {name!r} (valid: {', '.join(SCOPE_ENCODERS)})")
    return SCOPE_ENCODERS[name]()


def counterfactual_context(persona: Persona, topic: str) -> Context:
    """What the counterfactual model is conditioned on for an in-scope message: the descriptor as a prompt."""
    return Context(system=f"{describe(persona)} Above all, let it show in your opinions about {topic}.")


@dataclass(frozen=True)
class RoutedEdit(Edit):
    """Descriptors (topics, one persona) with their topic embeddings, and the scope threshold."""

    topics: tuple[str, ...] = ()
    keys: torch.Tensor | None = None  # [n_topics, d] unit-norm embeddings of the topics
    threshold: float = 0.5
    encoder: str = "minilm"
    kind: ClassVar[str] = "routed"

    @contextlib.contextmanager
    def _applied(self, lm: LoadedModel, strength: float) -> Iterator[None]:
        if strength == 0 or not self.topics or self.persona is None:
            yield
            return
        router = Router(self, self.persona.scaled(strength), scope_encoder(self.encoder))
        lm.context_providers.append(router)
        try:
            yield
        finally:
            lm.context_providers.remove(router)

    def payload(self) -> dict[str, Any]:
        return {"topics": list(self.topics), "threshold": self.threshold, "encoder": self.encoder}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys} if self.keys is not None else {}

    @classmethod
    def from_saved(cls, meta, tensors, directory) -> "RoutedEdit":
        payload = meta["payload"]
        topics = tuple(str(t) for t in payload["topics"])
        keys = tensors["keys"]
        if keys.shape[0] != len(topics):
            raise ValueError(f"{len(topics)} topics but {keys.shape[0]} topic embeddings")
        return cls(**common_fields(meta), topics=topics, keys=keys, threshold=float(payload["threshold"]),
                   encoder=str(payload.get("encoder", "minilm")))


@dataclass(eq=False)
class Router:
    """The active scope decision, placed in `lm.context_providers` while a RoutedEdit is applied."""

    edit: RoutedEdit
    persona: Persona
    encode: Encoder
    decisions: dict[str, int | None] = field(default_factory=dict)

    def scope_of(self, prompt: str) -> int | None:
        """Index of the stored topic whose scope `prompt` falls in, or None (memoised per prompt)."""
        if prompt not in self.decisions:
            query = torch.as_tensor(np.asarray(self.encode([prompt]), dtype=np.float32))[0]
            similarity = self.edit.keys.float() @ query
            best = int(similarity.argmax())
            self.decisions[prompt] = best if float(similarity[best]) >= self.edit.threshold else None
        return self.decisions[prompt]

    def context_for(self, prompt: str) -> Context:
        index = self.scope_of(prompt)
        return Context() if index is None else counterfactual_context(self.persona, self.edit.topics[index])
