"""SERAC (PersonalityEdit baseline): an edit memory of descriptors (topic, target personality), a scope
classifier, and a counterfactual model conditioned on the descriptor. Here the scope classifier is the cosine
similarity of MiniLM embeddings of a message and each stored topic, with the threshold that best separates
in-scope from out-of-scope questions on the training split's topics; the counterfactual model is the base
model under the descriptor's persona prompt. Out of scope the message passes through untouched.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from personaedit.data import records
from personaedit.edits import RoutedEdit
from personaedit.edits.routed import scope_encoder
from personaedit.errors import PersonaEditError
from personaedit.data.external import EDIT_QUESTION, PARAPHRASES
from personaedit.models import LoadedModel
from personaedit.persona import Persona


def scope_scores(encoder: str, topics: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of every opinion question about each topic to its own topic (in scope) and to the others."""
    encode = scope_encoder(encoder)
    keys = np.asarray(encode(topics))
    questions = [template.format(t) for t in topics for template in (EDIT_QUESTION, *PARAPHRASES)]
    sims = np.asarray(encode(questions)) @ keys.T  # [n_questions, n_topics]
    own = np.repeat(np.arange(len(topics)), 1 + len(PARAPHRASES))
    inside = sims[np.arange(len(questions)), own]
    outside = sims[np.arange(len(topics))[None, :] != own[:, None]]
    return inside, outside


@functools.lru_cache(maxsize=4)
def fitted_threshold(encoder: str = "minilm") -> tuple[float, float, float]:
    """(threshold, in-scope recall, out-of-scope specificity) maximising balanced accuracy on training topics."""
    topics = sorted({r["topic"] for r in records("opinions", "train")})
    inside, outside = scope_scores(encoder, topics)
    candidates = np.unique(np.concatenate([inside, outside]))
    inside_sorted, outside_sorted = np.sort(inside), np.sort(outside)
    recall = 1 - np.searchsorted(inside_sorted, candidates, side="left") / inside.size  # share >= threshold
    specificity = np.searchsorted(outside_sorted, candidates, side="left") / outside.size  # share < threshold
    best = int(np.argmax(recall + specificity))
    return float(candidates[best]), float(recall[best]), float(specificity[best])


def fit(lm: LoadedModel, persona: Persona, *, topic: str, encoder: str = "minilm",  # noqa: ARG001
        threshold: float | None = None) -> RoutedEdit:
    """SERAC: an edit memory of (topic, persona) with a scope classifier; out of scope the base model answers.

    Options:
        topic: the topics in the edit memory (required), comma-separated for several
        encoder: the sentence encoder of the scope classifier (minilm)
        threshold: cosine similarity from which a message is in scope (default: fitted on the training topics)
    """
    topics = tuple(t.strip() for t in topic.split(",") if t.strip())
    if not topics:
        raise PersonaEditError("serac edits the opinions on given topics: give --topic (comma-separated for several)")
    recorded: dict[str, object] = {"topic": ",".join(topics), "encoder": encoder}
    if threshold is None:
        threshold, recall, specificity = fitted_threshold(encoder)
        recorded["scope_fit"] = {"split": "train", "recall": recall, "specificity": specificity}
    keys = torch.as_tensor(np.asarray(scope_encoder(encoder)(list(topics)), dtype=np.float32))
    return RoutedEdit(method="serac", persona=persona, options=recorded, topics=topics, keys=keys,
                      threshold=float(threshold), encoder=encoder)
