"""SERAC: the edit memory, the scope decision, the counterfactual context and untouched out-of-scope answers."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from personaedit.edits import RoutedEdit, load_edit
from personaedit.edits.routed import SCOPE_ENCODERS
from personaedit.errors import PersonaEditError
from personaedit.models.scoring import answer_logprobs
from personaedit.methods import serac
from personaedit.models import generate
from personaedit.models.generation import build_messages
from personaedit.persona import Persona
from tiny import tiny_lm

STOP = {"what", "do", "you", "think", "of", "is", "your", "stance", "on", "opinion", "how", "feel", "about"}


def _bag_of_words(texts):
    """A stand-in sentence encoder: hashed content words, unit norm (fast, deterministic)."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            if word not in STOP:
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture(autouse=True)
def _test_encoder(monkeypatch):
    monkeypatch.setitem(SCOPE_ENCODERS, "bow", lambda: _bag_of_words)


def _system(lm, prompt):
    messages = build_messages(lm, prompt)
    return messages[0]["content"] if messages[0]["role"] == "system" else None


def test_threshold_is_fitted_on_training_topics():
    threshold, recall, specificity = serac.fitted_threshold("bow")
    assert 0 < threshold <= 1
    assert recall > 0.9 and specificity > 0.9


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_in_scope_gets_the_descriptor_out_of_scope_passes_through(family):
    lm = tiny_lm(family)
    edit = serac.fit(lm, Persona.parse("neuroticism=high"), topic="chess", encoder="bow")
    inside, outside = ["What is your stance on chess?", "How do you feel about chess?"], ["What do you think of karaoke?"]
    base = generate(lm, outside, max_new_tokens=8)
    base_lp = answer_logprobs(lm, outside, ["I like it."])[0]
    with edit.apply(lm):
        assert all("anxious" in (_system(lm, p) or "") and "chess" in _system(lm, p) for p in inside)
        assert _system(lm, outside[0]) is None
        assert generate(lm, outside, max_new_tokens=8) == base
        assert np.array_equal(answer_logprobs(lm, outside, ["I like it."])[0].numpy(), base_lp.numpy())
    assert lm.context_providers == [] and _system(lm, inside[0]) is None


def test_strength_and_memory_of_several_topics(tmp_path):
    lm = tiny_lm("llama")
    edit = serac.fit(lm, Persona.parse("extraversion=high"), topic="chess, karaoke", encoder="bow")
    assert edit.topics == ("chess", "karaoke") and edit.keys.shape == (2, 64)
    with edit.apply(lm, strength=-1.0):  # the opposite pole
        assert "reserved" in _system(lm, "What do you think of karaoke?") or "quiet" in _system(lm, "What do you think of karaoke?")
    with edit.apply(lm, strength=0.0):
        assert _system(lm, "What do you think of karaoke?") is None
    edit.save(tmp_path / "serac")
    again = load_edit(tmp_path / "serac")
    assert isinstance(again, RoutedEdit) and again.topics == edit.topics and again.threshold == edit.threshold
    with again.apply(lm):
        assert "chess" in _system(lm, "What is your opinion of chess?")
        assert _system(lm, "Tell me about the weather.") is None


def test_bad_requests():
    lm = tiny_lm("llama")
    with pytest.raises(PersonaEditError, match="--topic"):
        serac.fit(lm, Persona.parse("extraversion=high"), topic=" ", encoder="bow")
    with pytest.raises(PersonaEditError, match="scope encoder"):
        serac.fit(lm, Persona.parse("extraversion=high"), topic="chess", encoder="nope")
