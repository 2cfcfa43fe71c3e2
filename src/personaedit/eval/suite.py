"""Evaluation suites: one model, optionally under edits, measured before and after on held-out data.

quick: inventory self-report, trait expression on every held-out question (text judge), coherence,
       perplexity on neutral text, KL to the base model on neutral prompts, capability items; under an edit
       also the effect protocol (eval/effect.py): each trait's paired effect with its bootstrap interval and
       verdict, the log-probability margin of held-out pole texts, coherence as the base model's perplexity
       of the replies, and capability retention.
full:  the same with longer replies and more inventory items, plus robustness under a system prompt that
       asks for the opposite pole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from personaedit.data import records
from personaedit.edits import ComposedEdit, Edit
from personaedit.eval import metrics, readings
from personaedit.eval.topic_metrics import edit_topic, topic_metrics
from personaedit.eval.effect import effects_to_dict, mean_effect, paired_effect, paired_ratio, signed_logprob_changes, trait_effects
from personaedit.errors import PersonaEditError
from personaedit.models import LoadedModel, generate
from personaedit.models.scoring import next_token_logprobs
from personaedit.persona import BIG_FIVE, Persona, describe
from personaedit.progress import Progress, StagedProgress

SCHEMA = "personaedit-eval"
SCHEMA_VERSION = 2  # 2: effects (the effect protocol), capability, plausibility


@dataclass(frozen=True)
class SuiteConfig:
    questions_per_trait: int | None  # None: every held-out question
    neutral_questions: int | None
    max_new_tokens: int
    perplexity_texts: int | None
    inventory_items_per_facet: int
    robustness: bool
    capability_items: int | None = None  # None: every test item; 0: none
    # Under an edit: strengths besides 0 and 1 at which the situational questions are answered again, for
    # controllability (Spearman/Pearson of the score towards the persona against the strength).
    controllability_strengths: tuple[float, ...] = (0.5, 1.5)
    controllability_per_trait: int | None = None  # situational questions per trait asked again (None: all)


SUITES = {
    # 60 situational + 40 neutral = 100 held-out questions, the effect protocol's minimum.
    "quick": SuiteConfig(questions_per_trait=12, neutral_questions=40, max_new_tokens=48, perplexity_texts=8,
                         inventory_items_per_facet=1, robustness=True, controllability_per_trait=4),
    "full": SuiteConfig(questions_per_trait=None, neutral_questions=None, max_new_tokens=60, perplexity_texts=None,
                        inventory_items_per_facet=4, robustness=True, controllability_strengths=(0.5, 1.5, 2.0)),
}


def held_out_questions(config: SuiteConfig) -> list[dict[str, Any]]:
    """Test-split situational questions (per trait) and neutral questions: nothing here fits an edit."""
    chosen: list[dict[str, Any]] = []
    for trait in BIG_FIVE:
        rows = records("situational_questions", "test", trait=trait)
        chosen += rows[: config.questions_per_trait]
    neutral = records("neutral_questions", "test")[: config.neutral_questions]
    return chosen + [{**row, "trait": None} for row in neutral]


def _edits_persona(edit: Edit | None) -> Persona | None:
    """The poles the edits push towards: each part's persona, flipped where its weight × scale is negative."""
    if edit is None:
        return None
    composed = isinstance(edit, ComposedEdit)
    parts = list(edit.parts) if composed else [(edit, 1.0)]
    outer = edit.scale if composed else 1.0
    levels: dict[str, float] = {}
    for part, weight in parts:
        if part.persona is not None:
            sign = -1.0 if outer * weight * part.scale < 0 else 1.0
            levels.update(part.persona.scaled(sign).as_dict())
    return Persona.from_mapping(levels) if levels else None


def run_suite(
    lm: LoadedModel,
    edit: Edit | None = None,
    *,
    suite: str = "quick",
    force: bool = False,
    judge: Any = None,
    llm_judge: Any = None,
    on_progress: StagedProgress | None = None,
) -> dict[str, Any]:
    """Measure `lm` plainly and (when `edit` is given) under `edit`; return the report dict (see docs/EVAL.md)."""
    from personaedit.eval import inventory, metrics
    from personaedit.eval.text_judge import TextJudge

    if suite not in SUITES:
        raise PersonaEditError(f"unknown suite {suite!r} (valid: {', '.join(SUITES)})")
    config = SUITES[suite]
    if edit is not None:
        edit.check_fits(lm, force=force)
    judge = judge or TextJudge.load()
    started = time.perf_counter()
    questions = held_out_questions(config)
    prompts = [q["question"] for q in questions]
    texts = [r["text"] for r in records("neutral_text", "test")][: config.perplexity_texts]
    neutral_prompts = [r["question"] for r in records("neutral_questions", "test")]
    persona = _edits_persona(edit)

    def stage(name: str) -> Progress:
        return lambda done, total: on_progress(name, done, total) if on_progress else None

    margin = readings.margin_items(list(persona.as_dict())) if persona else []
    situational = [q["question"] for q in questions if q.get("trait")]
    capability = _capability_items(config)
    replies_of: dict[str, list[str]] = {}
    per_item: dict[str, dict[str, list[float]]] = {}

    def measure(label: str) -> dict[str, Any]:
        replies = generate(lm, prompts, max_new_tokens=config.max_new_tokens, on_batch=stage(f"{label}: replies"))
        replies_of[label] = replies
        scores, unscorable = _assess(judge, replies)
        per_item[label] = {
            "margin": readings.text_logprobs(lm, margin, on_progress=stage(f"{label}: log-prob margin")),
            "capability": readings.capability_correct(lm, capability, on_progress=stage(f"{label}: capability")),
        }
        result: dict[str, Any] = {
            "inventory": inventory.run_inventory(lm, items_per_facet=config.inventory_items_per_facet,
                                                 on_progress=stage(f"{label}: inventory")).to_dict(),
            "expression": _expression(questions, replies, scores),
            "coherence": {**_coherence(replies, metrics), "unscorable_share": _share(unscorable)},
            "perplexity": metrics.perplexity(lm, texts),
        }
        if capability:
            result["capability"] = {"accuracy": _share(per_item[label]["capability"]), "items": len(capability)}
        if config.robustness and persona is not None:
            opposite = describe(persona.scaled(-1))
            conflicted = generate(lm, situational, system=opposite, max_new_tokens=config.max_new_tokens,
                                  on_batch=stage(f"{label}: robustness"))
            conflicted_scores = judge.score(conflicted)
            per_item[label]["robust"] = [persona.towards(s) for s in conflicted_scores]
            result["robustness"] = {
                "system_prompt": opposite,
                "questions": len(situational),
                "mean_scores": _mean_scores(conflicted_scores),
            }
        return result

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "suite": suite,
        "model": {"spec": lm.spec, "fingerprint": lm.fingerprint, **lm.arch.describe()},
        "edit": edit.metadata() if edit is not None else None,
        "persona": persona.as_dict() if persona else None,
        "data": {"questions": len(prompts), "perplexity_texts": len(texts), "kl_prompts": len(neutral_prompts),
                 "split": "test"},
    }
    base_next = next_token_logprobs(lm, neutral_prompts)
    conditions = {"base": measure("base")}
    if edit is not None:
        with edit.apply(lm, force=force):
            conditions["edited"] = measure("edited")
            edited_next = next_token_logprobs(lm, neutral_prompts)
        if llm_judge is not None or topic_of(edit):  # each metric applies the edit itself
            report["personalityedit"] = _personalityedit(lm, edit, persona, judge, llm_judge, force)
        report["kl_to_base"] = metrics.kl_to_base([base_next], [edited_next])
        report["shift"] = _shift(conditions["base"], conditions["edited"])
        if persona is not None and config.controllability_strengths:
            report["controllability"] = _controllability(lm, edit, persona, situational, conditions, config, judge,
                                                         force, stage)
    # The base model's perplexity of every reply, edited ones included: outside the edit.
    reply_ppl = {label: readings.reply_perplexities(lm, prompts, replies, on_progress=stage(f"{label}: plausibility"))
                 for label, replies in replies_of.items()}
    for label, values in reply_ppl.items():
        conditions[label]["coherence"].update(_plausibility(values))
    if edit is not None:
        report["effects"] = _effects(persona, conditions, per_item, margin, reply_ppl)
    report["conditions"] = conditions
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def topic_of(edit: Edit) -> str | None:
    """The topic an edit (or a part of a composed one) was made for, if any."""
    parts = [part for part, _ in edit.parts] if isinstance(edit, ComposedEdit) else [edit]
    return next((t for t in map(edit_topic, parts) if t), None)


def _personalityedit(lm: LoadedModel, edit: Edit, persona: Persona | None, judge: Any, llm_judge: Any,
                     force: bool) -> dict[str, Any]:
    """ES, DD, Acc, TPEI (PAE with an LLM judge) on the edit's topic, or on the first test topic for an edit
    made without one; measured from outside the edit (each metric applies it itself)."""
    if persona is None:
        return {"skipped": "the edit names no persona"}
    topic = topic_of(edit) or sorted({r["topic"] for r in records("opinions", "test")})[0]
    try:
        return topic_metrics(lm, edit, persona, topic, judge, llm_judge=llm_judge, force=force)
    except PersonaEditError as exc:
        return {"skipped": str(exc)}


def _controllability(lm: LoadedModel, edit: Edit, persona: Persona, situational: list[str],
                     conditions: dict[str, Any], config: SuiteConfig, judge: Any, force: bool,
                     stage: Callable[[str], Progress]) -> dict[str, Any]:
    """The score towards the persona per situational question at strengths 0, 1 and the config's others; rank
    and linear correlation with the strength over every (strength, question) point."""
    asked: list[int] = []  # indices into the situational questions: the first few of each trait
    for trait in BIG_FIVE:
        of_trait = [i for i, r in enumerate(conditions["base"]["expression"]["replies"]) if r["trait"] == trait]
        asked += of_trait[: config.controllability_per_trait]

    def own(label: str) -> list[float]:
        replies = conditions[label]["expression"]["replies"]
        return [persona.towards(replies[i]["scores"]) for i in asked]

    by_strength = {0.0: own("base"), 1.0: own("edited")}
    for strength in config.controllability_strengths:
        with edit.apply(lm, strength, force=force):
            replies = generate(lm, [situational[i] for i in asked], max_new_tokens=config.max_new_tokens,
                               on_batch=stage(f"strength {strength:g}: replies"))
        by_strength[strength] = [persona.towards(s) for s in judge.score(replies)]
    ordered = sorted(by_strength)
    xs = [x for x in ordered for _ in by_strength[x]]
    ys = [y for x in ordered for y in by_strength[x]]
    return {"strengths": ordered, "mean_towards": [sum(by_strength[x]) / len(by_strength[x]) for x in ordered],
            "questions": len(asked), "spearman": metrics.spearman(xs, ys), "pearson": metrics.pearson(xs, ys)}


def _capability_items(config: SuiteConfig) -> list[dict[str, Any]]:
    if config.capability_items == 0:
        return []
    try:
        return readings.capability_items("test", config.capability_items)
    except PersonaEditError:  # an installation without the capability set measures the rest
        return []


def _assess(judge: Any, replies: list[str]) -> tuple[list[dict[str, float]], list[float]]:
    """Judge scores and, where the judge flags degenerate text, which replies it could not score."""
    assess = getattr(judge, "assess", None)
    if assess is None:
        return judge.score(replies), [0.0] * len(replies)
    assessed = assess(replies)
    return [a.scores for a in assessed], [float(a.unscorable) for a in assessed]


def _share(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _plausibility(perplexities: list[float]) -> dict[str, float]:
    finite = sorted(p for p in perplexities if p == p)
    return {
        "median_reply_perplexity": finite[len(finite) // 2] if finite else float("nan"),
        "plausible_share": _share([float(readings.plausible(p)) for p in perplexities]),
    }


def _effects(persona: Persona | None, conditions: dict[str, Any], per_item: dict[str, dict[str, list[float]]],
             margin: list[Any], reply_ppl: dict[str, list[float]]) -> dict[str, Any]:
    """The effect protocol's readings of base vs edited, each paired per item with its interval and verdict."""
    levels = persona.as_dict() if persona else {}
    base_scores = [r["scores"] for r in conditions["base"]["expression"]["replies"]]
    edited_scores = [r["scores"] for r in conditions["edited"]["expression"]["replies"]]
    effects: dict[str, Any] = {"traits": effects_to_dict(trait_effects(levels, base_scores, edited_scores))}
    changes = signed_logprob_changes(per_item["base"]["margin"], per_item["edited"]["margin"], [m.pole for m in margin])
    effects["logprob_margin"] = {
        dim: mean_effect([c for c, m in zip(changes, margin) if m.dimension == dim], seed=1).to_dict()
        for dim in levels}
    plausible = {label: [float(readings.plausible(p)) for p in values] for label, values in reply_ppl.items()}
    effects["plausibility"] = paired_effect(plausible["base"], plausible["edited"], seed=2).to_dict()
    if "robust" in per_item["base"]:
        effects["robustness"] = paired_effect(per_item["base"]["robust"], per_item["edited"]["robust"], seed=4).to_dict()
    if per_item["base"]["capability"]:
        effects["retention"] = paired_ratio(per_item["base"]["capability"], per_item["edited"]["capability"],
                                            seed=3).to_dict()
    return effects


def _mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    keys = scores[0].keys() if scores else []
    return {k: sum(s[k] for s in scores) / len(scores) for k in keys}


def _expression(questions: list[dict[str, Any]], replies: list[str], scores: list[dict[str, float]]) -> dict[str, Any]:
    """Mean judge score per dimension over all replies, and per trait over that trait's own questions."""
    own = {}
    for trait in BIG_FIVE:
        rows = [s[trait] for q, s in zip(questions, scores) if q.get("trait") == trait]
        if rows:
            own[trait] = sum(rows) / len(rows)
    return {
        "mean_scores": _mean_scores(scores),
        "own_question_scores": own,
        "replies": [{"id": q["id"], "trait": q.get("trait"), "question": q["question"], "reply": r, "scores": s}
                    for q, r, s in zip(questions, replies, scores)],
    }


def _coherence(replies: list[str], metrics) -> dict[str, float]:
    entropies = [metrics.ngram_entropy(r) for r in replies]
    return {
        "mean_ngram_entropy": sum(entropies) / max(len(entropies), 1),
        "coherent_share": sum(metrics.is_coherent(r) for r in replies) / max(len(replies), 1),
    }


def _shift(base: dict[str, Any], edited: dict[str, Any]) -> dict[str, Any]:
    """Edited minus base: judge scores, inventory scores, and the perplexity ratio."""
    b, e = base["expression"]["mean_scores"], edited["expression"]["mean_scores"]
    bi, ei = base["inventory"]["traits"], edited["inventory"]["traits"]
    return {
        "expression": {k: e[k] - b[k] for k in b},
        "inventory": {k: ei[k]["signed"] - bi[k]["signed"] for k in bi},
        "perplexity_ratio": edited["perplexity"] / base["perplexity"],
    }

