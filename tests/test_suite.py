import json

import pytest

from personaedit.eval.report import render_html
from personaedit.eval.suite import SUITES, held_out_questions, run_suite
from personaedit.methods import fit_edit
from personaedit.data import records


class FakeJudge:
    """Scores a text by its length, so edited replies (which differ) get other scores."""

    def score(self, texts, on_progress=None):
        keys = ["openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism", "ei", "sn", "tf", "jp"]
        return [{k: (len(t) % 7) / 7 - 0.5 for k in keys} for t in texts]


def test_quick_suite_questions_come_from_the_test_split_only():
    questions = held_out_questions(SUITES["quick"])
    test_ids = {r["id"] for name in ("situational_questions", "neutral_questions") for r in records(name, "test")}
    assert {q["id"] for q in questions} <= test_ids and len(questions) >= 100  # the effect protocol's minimum


def test_suite_measures_base_and_edited_and_renders(lm):
    edit = fit_edit("steer", lm, "extraversion=high", layer="1", pairs=8)
    stages = []
    report = run_suite(lm, 4 * edit, suite="quick", judge=FakeJudge(), on_progress=lambda s, d, t: stages.append(s))
    assert set(report["conditions"]) == {"base", "edited"}
    base, edited = report["conditions"]["base"], report["conditions"]["edited"]
    assert base["inventory"]["traits"]["extraversion"]["n_items"] == 6
    assert base["perplexity"] > 1 and edited["perplexity"] > 1
    assert report["kl_to_base"] > 0
    assert report["shift"]["perplexity_ratio"] == pytest.approx(edited["perplexity"] / base["perplexity"])
    assert report["persona"] == {"extraversion": 1.0} and report["data"]["split"] == "test"
    assert any("edited" in s for s in stages)
    effects = report["effects"]
    assert set(effects["traits"]["target"]) == {"extraversion"} and "openness" in effects["traits"]["off_target"]
    margin = effects["logprob_margin"]["extraversion"]
    assert margin["n"] >= 60 and margin["low"] <= margin["mean"] <= margin["high"]
    assert margin["verdict"] in ("moved", "moved the wrong way", "no measurable effect")
    assert 0 <= edited["coherence"]["plausible_share"] <= 1 and edited["coherence"]["median_reply_perplexity"] > 1
    assert effects["robustness"]["n"] == 60 and effects["retention"]["n"] == 80
    control = report["controllability"]
    assert control["strengths"] == [0.0, 0.5, 1.0, 1.5] and control["questions"] == 20
    assert -1 <= control["spearman"] <= 1 and len(control["mean_towards"]) == 4
    assert "personalityedit" not in report  # a steer edit made for no topic
    json.dumps(report)  # JSON-ready
    page = render_html(report)
    assert page.count("data:image/png;base64,") == 2 and "KL(base" in page
    assert "log-prob margin: extraversion (target)" in page and margin["verdict"] in page
    assert lm.context_providers == [] and all(not m._forward_hooks for m in lm.model.modules())


def test_suite_without_edit_profiles_the_base_model(lm):
    report = run_suite(lm, None, suite="quick", judge=FakeJudge())
    assert list(report["conditions"]) == ["base"] and "kl_to_base" not in report
    assert "no edit" in render_html(report)


def test_the_targeted_persona_follows_negation():
    from personaedit.edits import ComposedEdit
    from personaedit.eval.suite import _edits_persona
    from personaedit.methods.prompt import prompt_edit

    edit = prompt_edit("extraversion=high,tf=-0.5")
    assert _edits_persona(edit).as_dict() == {"extraversion": 1.0, "tf": -0.5}
    assert _edits_persona(-edit).as_dict() == {"extraversion": -1.0, "tf": 0.5}
    assert _edits_persona(ComposedEdit.of(edit, weights=[-2.0])).as_dict() == {"extraversion": -1.0, "tf": 0.5}


def test_an_edit_made_for_a_topic_gets_the_personalityedit_metrics(lm, monkeypatch):
    import dataclasses

    import numpy as np

    from personaedit.eval import suite as suite_module

    monkeypatch.setattr(suite_module, "SUITES", {"tiny": dataclasses.replace(
        SUITES["quick"], questions_per_trait=1, neutral_questions=1, capability_items=0, robustness=False,
        controllability_strengths=())})

    class TraitJudge(FakeJudge):
        def trait_probabilities(self, texts):
            return np.tile([0.1, 0.1, 0.6, 0.1, 0.1], (len(texts), 1))  # always extraversion

    edit = fit_edit("steer", lm, "extraversion=high", layer="1", pairs=8)
    edit = dataclasses.replace(edit, options={**edit.options, "topic": "chess"})
    class RatingJudge:  # an LLM judge: base replies rated 2, edited ones 4, one rating refused
        def rate_pae(self, texts, trait, pole):
            half = len(texts) // 2
            return [2] * (half - 1) + [None] + [4] * half

    report = run_suite(lm, 4 * edit, suite="tiny", judge=TraitJudge(), llm_judge=RatingJudge())
    topic = report["personalityedit"]
    assert topic["topic"] == "chess" and topic["trait"] == "extraversion" and topic["pole"] == "high"
    assert 0 <= topic["es"] <= 1 and topic["dd"] > 0 and topic["pae"] == pytest.approx(2.0)  # pairs rated both
    assert topic["pairs"] == 3 and (topic["coherent_pairs"] == 0 or topic["acc"] == 1.0)
    assert lm.context_providers == [] and all(not m._forward_hooks for m in lm.model.modules())
