"""What the benchmark measures in one condition of the model (base, or under an edit at a strength):
trait expression in replies to held-out questions, coherence, perplexity, KL to the base model, and
robustness under a system prompt that asks for the opposite pole. Plus the cost of fitting an edit."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.eval import metrics
from personaedit.models import LoadedModel, generate
from personaedit.models.scoring import next_token_logprobs
from personaedit.persona import BIG_FIVE, Persona, describe
from personaedit.progress import Stage



@dataclass(frozen=True)
class BenchSuite:
    max_new_tokens: int
    perplexity_texts: int | None  # None: every test paragraph
    robustness_questions: int | None  # situational questions asked again under the conflicting prompt
    questions_per_trait: int | None = None  # None: every test-split situational question
    neutral_questions: int | None = None  # None: every test-split neutral question


BENCH_SUITES = {
    "quick": BenchSuite(max_new_tokens=40, perplexity_texts=8, robustness_questions=10),
    "full": BenchSuite(max_new_tokens=60, perplexity_texts=None, robustness_questions=None),
}


def bench_suite(name: str) -> BenchSuite:
    if name not in BENCH_SUITES:
        raise PersonaEditError(f"unknown suite {name!r} (valid: {', '.join(BENCH_SUITES)})")
    return BENCH_SUITES[name]


def held_out_prompts(suite: BenchSuite) -> tuple[list[str], list[str]]:
    """(test-split situational and neutral questions, the situational ones alone). Nothing here fits an edit."""
    situational = [r["question"] for trait in BIG_FIVE
                   for r in records("situational_questions", "test", trait=trait)[: suite.questions_per_trait]]
    return situational + neutral_prompts(suite), situational


def neutral_texts(suite: BenchSuite) -> list[str]:
    return [r["text"] for r in records("neutral_text", "test")][: suite.perplexity_texts]


def neutral_prompts(suite: BenchSuite) -> list[str]:
    return [r["question"] for r in records("neutral_questions", "test")][: suite.neutral_questions]


def towards(persona: Persona, scores: dict[str, float]) -> float:
    """The score towards `persona`'s poles (see `Persona.towards`)."""
    return persona.towards(scores)


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} if scores else {}


def measure_condition(lm: LoadedModel, judge: Any, suite: BenchSuite, persona: Persona | None,
                      base_next: torch.Tensor | None, stage: Stage = lambda _: None) -> dict[str, Any]:
    """Measure the model as it is now (any edit already applied)."""
    prompts, situational = held_out_prompts(suite)
    stage("replies")
    replies = generate(lm, prompts, max_new_tokens=suite.max_new_tokens)
    scores = judge.score(replies)
    stage("perplexity")
    result: dict[str, Any] = {
        "scores": _mean(scores),
        "item_scores": scores,  # per question, in prompt order: effects are paired differences over these
        "coherent_share": sum(map(metrics.is_coherent, replies)) / len(replies),
        "mean_ngram_entropy": sum(map(metrics.ngram_entropy, replies)) / len(replies),
        "perplexity": metrics.perplexity(lm, neutral_texts(suite)),
        "samples": [{"question": q, "reply": r} for q, r in list(zip(prompts, replies))[:3]],
        "replies": replies,  # all of them, in prompt order: another judge can score them again
    }
    next_logprobs = next_token_logprobs(lm, neutral_prompts(suite))
    result["kl_to_base"] = 0.0 if base_next is None else metrics.kl_to_base([base_next], [next_logprobs])
    if persona is not None:
        result["towards"] = towards(persona, result["scores"])
        stage("robustness")
        asked = situational[: suite.robustness_questions]
        conflicted = generate(lm, asked, system=describe(persona.scaled(-1)), max_new_tokens=suite.max_new_tokens)
        result["robust_towards"] = towards(persona, _mean(judge.score(conflicted)))
        result["robust_replies"] = conflicted
    return result


def judge_identity(judge: Any) -> str:
    """What a bench folder pins about its judge: the encoder and a digest of the head's weights."""
    head = getattr(judge, "head", None)
    if head is None:
        return type(judge).__name__
    digest = hashlib.sha256(head.pole_weight.tobytes() + head.trait_weight.tobytes()).hexdigest()[:16]
    return f"{getattr(judge, 'encoder_key', 'unknown')}:{digest}"


def base_measurement(lm: LoadedModel, judge: Any, suite: BenchSuite, stage: Stage = lambda _: None) -> dict[str, Any]:
    return measure_condition(lm, judge, suite, None, None, stage)


def robust_base(lm: LoadedModel, judge: Any, suite: BenchSuite, persona: Persona) -> float:
    """The unedited model's score towards `persona` under the conflicting prompt: the reference for robustness."""
    _, situational = held_out_prompts(suite)
    asked = situational[: suite.robustness_questions]
    replies = generate(lm, asked, system=describe(persona.scaled(-1)), max_new_tokens=suite.max_new_tokens)
    return towards(persona, _mean(judge.score(replies)))


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """Sample RSS while the block runs; yields a dict that gets `seconds` and `peak_mb_above_start`."""
    start, peak = rss_bytes(), [rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    stats: dict[str, float] = {}
    began = time.perf_counter()
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        stats["seconds"] = round(time.perf_counter() - began, 2)
        stats["peak_mb_above_start"] = round((peak[0] - start) / 2**20, 1)
