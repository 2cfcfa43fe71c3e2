"""Per-item readings the effect protocol pairs: margin texts, plausibility, capability scoring."""

import math

import pytest

from personaedit.eval import readings


def test_margin_items_are_held_out_pole_texts_of_each_dimension():
    items = readings.margin_items(["extraversion", "tf"])
    extraversion = [i for i in items if i.dimension == "extraversion"]
    tf = [i for i in items if i.dimension == "tf"]
    assert len(extraversion) == 48 + 20 and len(tf) == 24 + 8  # check set + test split
    assert sum(i.pole > 0 for i in extraversion) == sum(i.pole < 0 for i in extraversion) == 34
    assert sum(i.pole > 0 for i in tf) == 16  # T is the first letter
    assert any(i.prompt.startswith("What do you think about ") for i in extraversion)


def test_first_number_and_plausibility():
    assert readings.first_number("The answer is 1,250 apples.") == 1250
    assert readings.first_number("-3 degrees") == -3
    assert readings.first_number("no digits here") is None
    assert readings.plausible(12.0) and not readings.plausible(800.0) and not readings.plausible(math.nan)


def test_capability_items_alternate_kinds_so_a_limit_keeps_both():
    items = readings.capability_items("test", limit=6)
    assert [i["kind"] for i in items] == ["choice", "arithmetic"] * 3
    assert len(readings.capability_items("test")) == 80


def test_capability_correct_picks_the_likeliest_option_and_matches_numbers(monkeypatch, lm):
    items = [{"kind": "choice", "question": "q1", "options": ["a", "b", "c", "d"], "answer": 2},
             {"kind": "arithmetic", "question": "q2", "answer": 7},
             {"kind": "choice", "question": "q3", "options": ["a", "b", "c", "d"], "answer": 0},
             {"kind": "arithmetic", "question": "q4", "answer": 12}]
    scores = [-3.0, -2.0, -0.5, -4.0,   # q1: option 2 likeliest: right
              -1.0, -0.2, -2.0, -2.0]   # q3: option 1 likeliest: wrong
    monkeypatch.setattr("personaedit.models.scoring.mean_answer_logprob", lambda lm_, prompts, answers: scores)
    monkeypatch.setattr(readings, "generate", lambda lm_, prompts, max_new_tokens: ["It is 7.", "About 13"])
    assert readings.capability_correct(lm, items) == [1.0, 1.0, 0.0, 0.0]


def test_reply_perplexities_are_exp_of_the_negative_mean_logprob(monkeypatch, lm):
    monkeypatch.setattr("personaedit.models.scoring.mean_answer_logprob",
                        lambda lm_, prompts, answers, on_progress=None: [-1.0, math.nan])
    assert readings.reply_perplexities(lm, ["a", "b"], ["x", ""]) == [pytest.approx(math.e), pytest.approx(math.nan, nan_ok=True)]
