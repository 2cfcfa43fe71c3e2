"""Evaluation suites: one model, optionally under edits, measured before and after on held-out data.

quick: inventory self-report, trait expression on held-out situational questions (text judge),
       coherence, perplexity on neutral text, KL to the base model on neutral prompts.
full:  the same on every held-out question and paragraph, longer replies, plus robustness under a
       system prompt that asks for the opposite pole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from personaedit.data import records
from personaedit.edits import ComposedEdit, Edit
from personaedit.errors import PersonaEditError
from personaedit.models import LoadedModel, generate
from personaedit.persona import BIG_FIVE, Persona, describe

SCHEMA = "personaedit-eval"
SCHEMA_VERSION = 1
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SuiteConfig:
    questions_per_trait: int | None  # None: every held-out question
    neutral_questions: int | None
    max_new_tokens: int
    perplexity_texts: int | None
    inventory_items_per_facet: int
    robustness: bool


SUITES = {
    "quick": SuiteConfig(questions_per_trait=4, neutral_questions=12, max_new_tokens=48, perplexity_texts=8,
                         inventory_items_per_facet=1, robustness=False),
    "full": SuiteConfig(questions_per_trait=None, neutral_questions=None, max_new_tokens=60, perplexity_texts=None,
                        inventory_items_per_facet=4, robustness=True),
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
    on_progress: Progress | None = None,
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

    def stage(name: str) -> Callable[[int, int], None]:
        return lambda done, total: on_progress(name, done, total) if on_progress else None

    def measure(label: str) -> dict[str, Any]:
        replies = generate(lm, prompts, max_new_tokens=config.max_new_tokens, on_batch=stage(f"{label}: replies"))
        scores = judge.score(replies)
        result: dict[str, Any] = {
            "inventory": inventory.run_inventory(lm, items_per_facet=config.inventory_items_per_facet,
                                                 on_progress=stage(f"{label}: inventory")).to_dict(),
            "expression": _expression(questions, replies, scores),
            "coherence": _coherence(replies, metrics),
            "perplexity": metrics.perplexity(lm, texts),
        }
        if config.robustness and persona is not None:
            opposite = describe(persona.scaled(-1))
            conflicted = generate(lm, prompts, system=opposite, max_new_tokens=config.max_new_tokens,
                                  on_batch=stage(f"{label}: robustness"))
            result["robustness"] = {
                "system_prompt": opposite,
                "mean_scores": _mean_scores(judge.score(conflicted)),
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
    base_next = metrics.next_token_logprobs(lm, neutral_prompts)
    conditions = {"base": measure("base")}
    if edit is not None:
        with edit.apply(lm, force=force):
            conditions["edited"] = measure("edited")
            edited_next = metrics.next_token_logprobs(lm, neutral_prompts)
        report["kl_to_base"] = metrics.kl_to_base([base_next], [edited_next])
        report["shift"] = _shift(conditions["base"], conditions["edited"])
    report["conditions"] = conditions
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


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
        "replies": [{"id": q["id"], "question": q["question"], "reply": r, "scores": s}
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

