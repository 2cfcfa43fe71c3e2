"""The PersonalityEdit metrics of an edit made for one topic (MEND, SERAC, or any edit given a topic).

- ES (edit success): the topic's opinion in the persona's trait against its other traits' opinions, asked with
  three paraphrased questions, and against the base model's likelihood of the same opinion.
- DD (drawdown): KL(base ‖ edited) over the answer tokens of opinions on two other topics (outer scope).
- Acc / TPEI: greedy replies (first line) to the paraphrased questions, classified by the text judge's
  five-way trait head; coherent pairs only.
- PAE: an LLM judge's 1–5 rating of the replies for the persona's pole, edited minus base (optional).

Opinions come from the project's `opinions` data (every topic holds one opinion per trait and pole).
"""

from __future__ import annotations

import math
from typing import Any

from personaedit.data import records
from personaedit.data.external import EDIT_QUESTION, PARAPHRASES, PERSONALITYEDIT_TRAITS
from personaedit.edits import Edit
from personaedit.errors import PersonaEditError
from personaedit.eval.metrics import accuracy, coherent_pairs, first_line, measure_dd, measure_es, pae, tpei
from personaedit.models import LoadedModel, generate
from personaedit.persona import BIG_FIVE, Persona



def all_topics() -> list[str]:
    return sorted({r["topic"] for r in records("opinions")})


def opinion(topic: str, trait: str, pole: str) -> str:
    rows = records("opinions", topic=topic, trait=trait, pole=pole)
    if not rows:
        raise PersonaEditError(f"no {pole}-{trait} opinion on {topic!r} in the project's opinions data")
    return rows[0]["text"]


def edit_topic(edit: Edit) -> str | None:
    """The first topic an edit was made for (`--topic`), if any."""
    topic = (edit.options or {}).get("topic")
    return str(topic).split(",")[0].strip() if topic else None


def _replies(lm: LoadedModel, questions: list[str], max_new_tokens: int) -> list[str]:
    return [first_line(t) for t in generate(lm, questions, max_new_tokens=max_new_tokens)]


def topic_metrics(lm: LoadedModel, edit: Edit, persona: Persona, topic: str, judge: Any, *, llm_judge: Any = None,
                  strength: float = 1.0, max_new_tokens: int = 60, force: bool = False) -> dict[str, Any]:
    """ES, DD, Acc, TPEI (and PAE with `llm_judge`) of `edit` for `persona`'s first Big Five trait on `topic`."""
    if topic not in all_topics():
        raise PersonaEditError(f"topic {topic!r} has no opinions in the project's data (topics: "
                               f"{', '.join(all_topics()[:8])}, …)")
    traits = [(dim, level) for dim, level in persona.as_dict().items() if dim in BIG_FIVE and level]
    if not traits:
        raise PersonaEditError("the PersonalityEdit metrics need a Big Five trait in the persona")
    trait, level = traits[0]
    pole = "high" if level > 0 else "low"
    others = [t for t in PERSONALITYEDIT_TRAITS if t != trait][:2]
    target = [(q.format(topic), opinion(topic, trait, pole)) for q in PARAPHRASES]
    other = [(q.format(topic), opinion(topic, t, pole)) for q in PARAPHRASES for t in others]
    topics = all_topics()
    outer_topics = [topics[(topics.index(topic) + k) % len(topics)] for k in (1, 2)]
    outer = [(EDIT_QUESTION.format(o), opinion(o, t, p)) for o in outer_topics
             for t, p in (("extraversion", "high"), ("neuroticism", "low"))]
    edit.check_fits(lm, force=force)
    scaled = edit.scaled(strength)
    result: dict[str, Any] = {"topic": topic, "trait": trait, "pole": pole, "outer_topics": outer_topics,
                              "es": measure_es(lm, scaled, target, other), "dd": measure_dd(lm, scaled, outer)}
    questions = [q for q, _ in target]
    base = _replies(lm, questions, max_new_tokens)
    with scaled.apply(lm, force=force):
        edited = _replies(lm, questions, max_new_tokens)
    coherent = coherent_pairs(base, edited)
    index = list(BIG_FIVE).index(trait)
    result.update({"replies": {"base": base, "edited": edited}, "coherent_pairs": len(coherent), "pairs": len(base),
                   "acc": math.nan, "tpei": math.nan, "pae": None})
    if coherent:
        base_probs = judge.trait_probabilities([base[i] for i in coherent])
        edited_probs = judge.trait_probabilities([edited[i] for i in coherent])
        result["acc"] = accuracy(edited_probs, index)
        result["tpei"] = tpei(base_probs, edited_probs, index)
    if llm_judge is not None:
        ratings = llm_judge.rate_pae([*base, *edited], trait, pole)
        pairs = [(b, e) for b, e in zip(ratings[:len(base)], ratings[len(base):]) if b is not None and e is not None]
        result["pae"] = pae([b for b, _ in pairs], [e for _, e in pairs]) if pairs else None
    return result
