"""Per-model calibration of an activation method's layers and strength, or a weight edit's strength, chosen on
validation questions.

The papers tuned their layers and strengths on 1.5–8B models; on another model the same numbers can do
nothing or wreck the text. For each candidate setting (a method-specific set of fit options × strengths) the
model answers the persona's validation questions with the edit applied, and the calibration records:
- the trait effect: the judge's score towards the persona, edited − unedited, paired per question, with its
  interval (`eval.effect`);
- coherence: the share of coherent replies;
- the perplexity ratio: how plausible the *unedited* model finds the edited replies, relative to the
  unedited replies (geometric means of per-reply perplexity) — it catches text an edit has broken.
The chosen setting is the largest effect whose coherence and perplexity stay within the budget (default:
perplexity ≤ 1.5×, coherent ≥ 90%). The result is cached per (model fingerprint, method, persona, budget,
questions; the package ships the default model's), and a calibrated edit carries it in its options (`info` shows it) with the chosen strength as its
scale, so strength 1 means the calibrated strength. Nothing here sees a test question.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from personaedit.data import records
from personaedit.edits import Edit
from personaedit.errors import PersonaEditError
from personaedit.eval.effect import Effect, paired_effect
from personaedit.eval.metrics import is_coherent
from personaedit.eval.readings import reply_perplexities
from personaedit.fileio import write_json_atomic
from personaedit.methods.dpnle import default_layers
from personaedit.methods.registry import METHODS, fit_edit
from personaedit.models import LoadedModel, generate
from personaedit.models.loading import cache_dir
from personaedit.persona import BIG_FIVE, Persona
from personaedit.progress import Stage

CALIBRATED = tuple(m.name for m in METHODS if m.calibrated)


@dataclass(frozen=True)
class Budget:
    perplexity_ratio: float = 1.5
    coherent_share: float = 0.9


def search_space(method: str, lm: LoadedModel) -> tuple[list[dict[str, Any]], list[float]]:
    """(fit option sets, strengths) tried for `method` on `lm`."""
    if method == "steer":  # CAA's generated positions at the probe's layer; the prompt too (ActAdd, repeng), there
        n = lm.arch.num_layers  # or on a band: repeng's layers (−5 … −17 of 30 in its README) scaled to the depth
        band = f"{round(n * 13 / 30)}-{round(n * 25 / 30)}"  # strength 1 is 8× the mean difference
        # and repeng's reading too: at the start of a reply, where the poles differ less (on the default model its
        # band moved extraversion most at 3× the prompt reading's strength scale, so 32 = 4 × 8 spans it) — after a
        # question, or after the persona's description alone, as repeng's instructions (which differ more: 8)
        reply = {"layer": band, "prompt_too": True, "read_at": "reply"}
        return ([{}, {"prompt_too": True}, {"layer": band, "prompt_too": True}, {**reply, "scale": 32.0},
                 {**reply, "instruction_only": True, "scale": 8.0}], [0.25, 0.5, 0.75, 1.0, 1.5])
    if method == "npti":  # the reference sweeps its `val` over 0.6–1.5
        return [{}], [0.6, 1.0, 1.5, 2.0, 3.0]
    if method == "dpnle":  # the reference's layers scaled to the depth, and the middle half; γ well past the
        n = lm.arch.num_layers  # reference's 1, since a small model's neurons move less text per unit
        ranges = {f"{default_layers(n)[0]}-{n - 1}", f"{n // 4}-{max(n // 4, round(n * 3 / 4) - 1)}"}
        return [{"layers": r} for r in sorted(ranges)], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    if method == "palette":  # its layer and queries follow the paper (C = I), or ROME's whitened C⁻¹k*, which
        # leaves the text of post-norm Gemma-3-270M far less moved; the rank-one updates' sum is scaled down where
        # a model's text breaks at the full update. Where the MLP's output is normalised, most δ sit at the clamp
        # (4‖v₀‖), so a tighter one is tried too (on Gemma-3-270M it kept the text within budget at 0.25)
        options = [{}, {"covariance": True}]
        if lm.arch.mlp_output_normed:
            options.append({"covariance": True, "clamp": 2.0})
        return options, [0.25, 0.5, 0.75, 1.0]
    raise PersonaEditError(f"calibrate supports {', '.join(CALIBRATED)}; {method!r} has no layer or strength to "
                           "search")


def validation_questions(persona: Persona, n: int) -> list[str]:
    """The persona's own traits' validation questions first, then other validation questions, up to `n`."""
    own = [r["question"] for dim in persona.dimensions() if dim.name in BIG_FIVE
           for r in records("situational_questions", "validation", trait=dim.name)]
    others = [r["question"] for r in records("situational_questions", "validation") if r["question"] not in own]
    others += [r["question"] for r in records("neutral_questions", "validation")]
    return (own + others)[:n]


@dataclass(frozen=True)
class Trial:
    options: dict[str, Any]
    strength: float
    effect: Effect
    coherent_share: float
    perplexity_ratio: float

    def within(self, budget: Budget, base_coherent: float) -> bool:
        return within_budget(self.coherent_share, self.perplexity_ratio, budget, base_coherent)

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.options, "strength": self.strength, "effect": self.effect.to_dict(),
                "coherent_share": self.coherent_share, "perplexity_ratio": self.perplexity_ratio}


def within_budget(coherent_share: float, perplexity_ratio: float, budget: Budget, base_coherent: float) -> bool:
    """Coherent at least as often as the budget asks, or as the unedited model is where that is less (a base
    model's short replies often read as incoherent), and perplexity within the budget."""
    return (coherent_share >= min(budget.coherent_share, base_coherent)
            and not math.isnan(perplexity_ratio) and perplexity_ratio <= budget.perplexity_ratio)


def geometric_mean(values: Sequence[float]) -> float:
    kept = [math.log(v) for v in values if not math.isnan(v) and v > 0]
    return math.exp(sum(kept) / len(kept)) if kept else math.nan


def _key(method: str, persona: Persona, budget: Budget, questions: list[str], max_new_tokens: int,
         space: tuple[list[dict[str, Any]], list[float]]) -> str:
    return hashlib.sha256(json.dumps([method, persona.spec(), dataclasses.asdict(budget), questions,
                                      max_new_tokens, space]).encode()).hexdigest()[:16]


def calibration_key(lm: LoadedModel, method: str, persona: Persona, *, budget: Budget = Budget(), questions: int = 36,
                    max_new_tokens: int = 40) -> str:
    """The key a calibration with these settings has under the current search space (a changed space: a new key)."""
    return _key(method, persona, budget, validation_questions(persona, questions), max_new_tokens,
                search_space(method, lm))


def _cache_path(lm: LoadedModel, method: str, key: str) -> Any:
    return cache_dir() / "calibration" / lm.fingerprint / f"{method}-{key}.json"


def stored(lm: LoadedModel, method: str, persona: Persona, *, budget: Budget = Budget(), questions: int = 36,
           max_new_tokens: int = 40) -> dict[str, Any] | None:
    """The calibration with these settings from the user cache or the package, without measuring anything."""
    key = calibration_key(lm, method, persona, budget=budget, questions=questions, max_new_tokens=max_new_tokens)
    path = _cache_path(lm, method, key)
    if path.is_file():
        return json.loads(path.read_text())
    return shipped(lm.fingerprint, key)


def shipped(fingerprint: str, key: str) -> dict[str, Any] | None:
    """A calibration the package ships (measured on the default model, docs/BENCHMARKS.md), if it has this one."""
    for row in records("calibrations"):
        if row["fingerprint"] == fingerprint and row["key"] == key:
            return row
    return None


def calibrate(lm: LoadedModel, method: str, persona: Persona, judge: Any, *, budget: Budget = Budget(),
              questions: int = 36, max_new_tokens: int = 40, use_cache: bool = True,
              stage: Stage = lambda _: None) -> dict[str, Any]:
    """Try every setting of `method`'s search space on validation questions; return the trials and the choice
    (`chosen` is None when no setting stays within the budget)."""
    options_sets, strengths = search_space(method, lm)
    asked = validation_questions(persona, questions)
    key = _key(method, persona, budget, asked, max_new_tokens, (options_sets, strengths))
    if use_cache and (known := stored(lm, method, persona, budget=budget, questions=questions,
                                      max_new_tokens=max_new_tokens)) is not None:
        return known
    stage("unedited replies")
    base_replies = generate(lm, asked, max_new_tokens=max_new_tokens)
    base_towards = [persona.towards(s) for s in judge.score(base_replies)]
    base_coherent = sum(map(is_coherent, base_replies)) / len(base_replies)
    base_perplexity = geometric_mean(reply_perplexities(lm, asked, base_replies))
    trials: list[Trial] = []
    for options in options_sets:
        stage(f"fitting {method} {json.dumps(options)}")
        edit = fit_edit(method, lm, persona, **options)
        for strength in strengths:
            stage(f"{method} {json.dumps(options)} at strength {strength:g}")
            with edit.apply(lm, strength):
                replies = generate(lm, asked, max_new_tokens=max_new_tokens)
            towards = [persona.towards(s) for s in judge.score(replies)]
            ratio = geometric_mean(reply_perplexities(lm, asked, replies)) / base_perplexity
            trials.append(Trial(options, strength, paired_effect(base_towards, towards),
                                sum(map(is_coherent, replies)) / len(replies), ratio))
    admissible = [t for t in trials if t.within(budget, base_coherent)]
    chosen = max(admissible, key=lambda t: t.effect.mean, default=None)
    result = {
        "method": method, "persona": persona.spec(), "model": lm.spec, "fingerprint": lm.fingerprint, "key": key,
        "budget": dataclasses.asdict(budget), "questions": len(asked), "split": "validation",
        "max_new_tokens": max_new_tokens, "base_coherent_share": base_coherent, "trials": [t.to_dict() for t in trials],
        "chosen": None if chosen is None else chosen.to_dict(),
    }
    if use_cache:
        write_json_atomic(_cache_path(lm, method, key), result)
    return result


def calibrated_edit(lm: LoadedModel, method: str, persona: Persona, calibration: dict[str, Any],
                    **options: Any) -> Edit:
    """The edit at the calibration's choice: fitted with its options, its strength as the edit's scale, and
    the calibration in its options. Without a choice (nothing within budget) this refuses."""
    chosen = calibration.get("chosen")
    if chosen is None:
        raise PersonaEditError(f"no {method} setting kept coherence and perplexity within the budget on this model "
                               "(see the trials with `personaedit calibrate`)")
    edit = fit_edit(method, lm, persona, **{**options, **chosen["options"]})
    summary = {"strength": chosen["strength"], "options": chosen["options"], "validation": chosen,
               "budget": calibration["budget"], "questions": calibration["questions"]}
    return dataclasses.replace(edit, options={**edit.options, "calibration": summary},
                               scale=edit.scale * chosen["strength"])
