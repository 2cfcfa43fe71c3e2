"""The effect protocol: what an edit did, as paired differences with bootstrap intervals and a verdict.

An effect is the mean over held-out items of a paired difference (edited − base, signed towards the persona
where a persona gives the direction), with a bootstrap confidence interval (95% by default). The verdict is
read from the interval, never from the point estimate:
- "moved"                 the whole interval lies above 0 (towards the persona);
- "moved the wrong way"   the whole interval lies below 0;
- "no measurable effect"  the interval covers 0.

`eval`, `bench` and `demo` all report effects through `paired_effect` / `trait_effects`, so a number in one
report means what it means in another. Ratios (retained accuracy) use `paired_ratio` with the same bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

MOVED = "moved"
WRONG_WAY = "moved the wrong way"
NO_EFFECT = "no measurable effect"
CONFIDENCE = 0.95
RESAMPLES = 2000
# Below this many items a percentile bootstrap interval is too narrow (with 2 items it is just their range);
# the mean's interval is then Student's t, which widens as the items get fewer.
SMALL_SAMPLE = 20


@dataclass(frozen=True)
class Effect:
    """A mean with its bootstrap interval over `n` paired items; `reference` is the value that means 'no change'
    (0 for differences, 1 for ratios)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE
    reference: float = 0.0

    @property
    def verdict(self) -> str:
        if self.n == 0 or math.isnan(self.low) or math.isnan(self.high):
            return NO_EFFECT
        if self.low > self.reference:
            return MOVED
        if self.high < self.reference:
            return WRONG_WAY
        return NO_EFFECT

    def describe(self, spec: str = "+.3f") -> str:
        """`+0.120 [+0.050, +0.190]`"""
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence, "verdict": self.verdict}


def _interval(data: tuple[np.ndarray, ...], statistic: Callable[..., float], *, confidence: float, resamples: int,
              seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over items resampled together (paired)."""
    from scipy.stats import bootstrap

    n = len(data[0])
    if n < 2:
        return math.nan, math.nan
    if all(np.all(d == d[0]) for d in data):  # no spread to resample: the interval is the point
        value = float(statistic(*data))
        return value, value
    result = bootstrap(data, statistic, paired=True, vectorized=False, confidence_level=confidence,
                       n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student's t interval of the mean (NaN for a single item, the point for items that do not vary)."""
    from scipy.stats import t

    if values.size < 2:
        return math.nan, math.nan
    spread = float(values.std(ddof=1)) / math.sqrt(values.size)
    mean = float(values.mean())
    if spread == 0:
        return mean, mean
    half = float(t.ppf(0.5 + confidence / 2, values.size - 1)) * spread
    return mean - half, mean + half


def mean_effect(differences: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                seed: int = 0) -> Effect:
    """The mean of per-item differences with its interval: percentile bootstrap, or Student's t below
    SMALL_SAMPLE items (NaN items are dropped)."""
    values = np.asarray([d for d in differences if not math.isnan(d)], dtype=np.float64)
    if values.size == 0:
        return Effect(math.nan, math.nan, math.nan, 0, confidence)
    if values.size < SMALL_SAMPLE:
        low, high = _t_interval(values, confidence)
    else:
        low, high = _interval((values,), np.mean, confidence=confidence, resamples=resamples, seed=seed)
    return Effect(float(values.mean()), low, high, int(values.size), confidence)


def paired_effect(base: Sequence[float], edited: Sequence[float], *, sign: float = 1.0,
                  confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Effect:
    """Mean of sign·(edited − base) over paired items, with its bootstrap interval."""
    if len(base) != len(edited):
        raise ValueError(f"paired measurements differ in length: {len(base)} base, {len(edited)} edited")
    return mean_effect([sign * (float(e) - float(b)) for b, e in zip(base, edited)], confidence=confidence,
                       resamples=resamples, seed=seed)


def paired_ratio(base: Sequence[float], edited: Sequence[float], *, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0) -> Effect:
    """mean(edited) / mean(base) over paired items (e.g. retained accuracy), with a paired bootstrap interval;
    the verdict's reference is 1 ('moved' = above the base, 'moved the wrong way' = below)."""
    b, e = np.asarray(base, dtype=np.float64), np.asarray(edited, dtype=np.float64)
    if b.shape != e.shape:
        raise ValueError(f"paired measurements differ in length: {b.size} base, {e.size} edited")
    if b.size == 0 or b.mean() == 0:
        return Effect(math.nan, math.nan, math.nan, int(b.size), confidence, reference=1.0)

    def ratio(x: np.ndarray, y: np.ndarray) -> float:
        return float(y.mean() / x.mean()) if x.mean() else math.nan

    low, high = _interval((b, e), ratio, confidence=confidence, resamples=resamples, seed=seed)
    return Effect(ratio(b, e), low, high, int(b.size), confidence, reference=1.0)


def trait_effects(levels: Mapping[str, float], base_scores: Sequence[Mapping[str, float]],
                  edited_scores: Sequence[Mapping[str, float]], *, confidence: float = CONFIDENCE,
                  resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, Effect]]:
    """Per dimension of the judge, the paired effect of the edit on the replies' scores.

    `target`: the persona's dimensions, signed towards each one's pole (+ = towards the persona).
    `off_target`: every other dimension, unsigned (edited − base), to show what else moved."""
    if len(base_scores) != len(edited_scores):
        raise ValueError("base and edited replies differ in number")
    dims = list(base_scores[0]) if base_scores else []
    result: dict[str, dict[str, Effect]] = {"target": {}, "off_target": {}}
    for dim in dims:
        level = levels.get(dim, 0.0)
        group = "target" if level else "off_target"
        result[group][dim] = paired_effect([s[dim] for s in base_scores], [s[dim] for s in edited_scores],
                                           sign=1.0 if level >= 0 else -1.0, confidence=confidence,
                                           resamples=resamples, seed=seed)
    return result


def signed_logprob_changes(base: Sequence[float], edited: Sequence[float], poles: Sequence[float]) -> list[float]:
    """Per text, sign(pole)·(log p_edited − log p_base): positive when the edit makes a high-pole text likelier or a
    low-pole text less likely. Their mean is the change in the high-vs-low log-probability margin."""
    if not len(base) == len(edited) == len(poles):
        raise ValueError("base, edited and poles differ in length")
    return [(1.0 if pole > 0 else -1.0) * (float(e) - float(b)) for b, e, pole in zip(base, edited, poles)]


def effects_to_dict(effects: Mapping[str, Mapping[str, Effect]]) -> dict[str, dict[str, dict[str, Any]]]:
    return {group: {dim: effect.to_dict() for dim, effect in items.items()} for group, items in effects.items()}
