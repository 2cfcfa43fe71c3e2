"""The effect protocol: paired differences, bootstrap intervals and verdicts read from them."""

import math

import numpy as np
import pytest

from personaedit.eval.effect import (MOVED, NO_EFFECT, WRONG_WAY, Effect, mean_effect, paired_effect, paired_ratio,
                                     signed_logprob_changes, trait_effects)


def test_paired_effect_is_the_mean_signed_difference():
    effect = paired_effect([0.0, 0.5, -0.5, 0.2], [0.3, 0.5, 0.1, 0.6])
    assert effect.mean == pytest.approx((0.3 + 0.0 + 0.6 + 0.4) / 4)
    assert effect.n == 4 and effect.low <= effect.mean <= effect.high
    assert paired_effect([0.0, 0.5], [0.3, 0.5], sign=-1).mean == pytest.approx(-0.15)


def test_verdicts_come_from_the_interval_not_the_point():
    assert Effect(0.10, 0.02, 0.18, 100).verdict == MOVED
    assert Effect(-0.10, -0.18, -0.02, 100).verdict == WRONG_WAY
    assert Effect(0.30, -0.01, 0.61, 100).verdict == NO_EFFECT  # a large point estimate, an interval over 0
    assert Effect(math.nan, math.nan, math.nan, 0).verdict == NO_EFFECT
    assert Effect(1.2, 1.05, 1.3, 50, reference=1.0).verdict == MOVED
    assert Effect(0.9, 0.8, 0.99, 50, reference=1.0).verdict == WRONG_WAY


def test_a_clear_shift_is_moved_and_a_clear_reversal_wrong_way():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.3, 120)
    assert paired_effect(base, base + 0.2 + rng.normal(0, 0.1, 120)).verdict == MOVED
    assert paired_effect(base, base - 0.2 + rng.normal(0, 0.1, 120)).verdict == WRONG_WAY


def test_a_null_effects_interval_covers_zero_in_at_least_90_percent_of_draws():
    covered = 0
    draws = 200
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        base = rng.normal(0, 0.4, 100)
        edited = base + rng.normal(0, 0.3, 100)  # noise only: no true effect
        effect = paired_effect(base, edited, resamples=400, seed=seed)
        covered += effect.low <= 0 <= effect.high
    assert covered / draws >= 0.90


def test_the_interval_matches_a_hand_computed_percentile_bootstrap():
    values = np.array([0.1, 0.4, -0.2, 0.3, 0.0, 0.5, 0.2, -0.1] * 3)  # 24 items: the bootstrap's range
    effect = mean_effect(values, resamples=3000, seed=7)
    rng = np.random.default_rng(123)
    means = values[rng.integers(0, values.size, (20000, values.size))].mean(1)
    assert effect.low == pytest.approx(np.quantile(means, 0.025), abs=0.02)
    assert effect.high == pytest.approx(np.quantile(means, 0.975), abs=0.02)


def test_few_items_get_students_t_interval():
    values = [0.19, 0.02]  # two questions: a bootstrap would call [+0.02, +0.19] an effect
    effect = mean_effect(values)
    half = 12.7062047 * np.std(values, ddof=1) / np.sqrt(2)  # t(0.975, 1 degree of freedom)
    assert effect.low == pytest.approx(0.105 - half) and effect.high == pytest.approx(0.105 + half)
    assert effect.verdict == NO_EFFECT
    assert mean_effect([0.3, 0.35, 0.32, 0.31, 0.33]).verdict == MOVED  # few but consistent items still count
    assert math.isnan(mean_effect([0.4]).low)


def test_constant_differences_give_a_point_interval_and_nan_items_are_dropped():
    effect = mean_effect([0.2, 0.2, 0.2, math.nan])
    assert (effect.mean, effect.low, effect.high, effect.n) == (pytest.approx(0.2), pytest.approx(0.2),
                                                                pytest.approx(0.2), 3)
    assert mean_effect([]).n == 0 and mean_effect([]).verdict == NO_EFFECT


def test_paired_ratio_is_retained_accuracy():
    base = [1, 1, 0, 1, 1, 0, 1, 1, 1, 1]
    edited = [1, 0, 0, 1, 1, 0, 1, 0, 1, 1]
    effect = paired_ratio(base, edited)
    assert effect.mean == pytest.approx(6 / 8) and effect.low <= 0.75 <= effect.high
    assert paired_ratio(base, base).verdict == NO_EFFECT
    assert math.isnan(paired_ratio([0, 0], [1, 1]).mean)


def test_trait_effects_sign_towards_the_persona_and_keep_other_traits_unsigned():
    base = [{"extraversion": 0.0, "openness": 0.1}] * 3 + [{"extraversion": 0.1, "openness": 0.0}] * 3
    edited = [{"extraversion": -0.4, "openness": 0.3}] * 3 + [{"extraversion": -0.3, "openness": 0.2}] * 3
    effects = trait_effects({"extraversion": -1.0}, base, edited)
    assert effects["target"]["extraversion"].mean == pytest.approx(0.4)  # towards introversion: positive
    assert effects["target"]["extraversion"].verdict == MOVED
    assert effects["off_target"]["openness"].mean == pytest.approx(0.2)


def test_signed_logprob_changes_measure_the_margin():
    changes = signed_logprob_changes(base=[-2.0, -2.0], edited=[-1.5, -2.5], poles=[1, -1])
    assert changes == [pytest.approx(0.5), pytest.approx(0.5)]
    with pytest.raises(ValueError):
        signed_logprob_changes([0.0], [0.0, 1.0], [1])
