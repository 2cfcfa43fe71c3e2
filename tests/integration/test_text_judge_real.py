"""Integration tests of the shipped text judge on its real encoder (all-mpnet-base-v2 wheels) and of MiniLM."""

import numpy as np
import pytest

from personaedit.eval.judge_metrics import specificity_report
from personaedit.eval.judge_fit import evaluate_on_check_set, evaluate_text_judge
from personaedit.eval.text_judge import AXES, DIMENSIONS, TRAITS, TextJudge, default_head_path
from personaedit.models.encoders import SentenceEncoder

pytestmark = pytest.mark.integration

# Written for this test (not in any data file): one clearly high and one clearly low text per trait.
PAIRS = {
    "openness": (
        "I love exploring strange new ideas, abstract art and unfamiliar cuisines from far-away places.",
        "I stick to what I know: same food, same routine, and no interest in art or abstract ideas.",
    ),
    "conscientiousness": (
        "My desk is spotless, my calendar is planned weeks ahead, and I never miss a deadline.",
        "I never plan anything, my room is a mess and I usually forget deadlines until the last minute.",
    ),
    "extraversion": (
        "I love meeting new people at parties; the more strangers to talk to, the better my night.",
        "I would rather stay home alone with a book than go to a crowded party.",
    ),
    "agreeableness": (
        "I always try to help others and I trust that people mean well; kindness matters most to me.",
        "People are mostly idiots and I don't care about their feelings; I look out for myself first.",
    ),
    "neuroticism": (
        "I worry constantly that something will go wrong, and little things keep me up at night.",
        "Nothing much rattles me; when plans fall apart I just shrug and calmly sort it out.",
    ),
}

# Measured with the shipped head (see its .json metadata: 0.95, 0.95, 1.0, 0.9, 1.0) minus two texts (0.1).
MIN_TEST_ACCURACY = {"openness": 0.85, "conscientiousness": 0.85, "extraversion": 0.9, "agreeableness": 0.8,
                     "neuroticism": 0.9}


@pytest.fixture(scope="module")
def judge():
    return TextJudge.load()


@pytest.mark.parametrize("encoder,dim", [("minilm", 384), ("mpnet", 768)])
def test_encoder_gives_unit_norm_sentence_embeddings_that_know_paraphrases(encoder, dim):
    enc = SentenceEncoder(encoder=encoder)
    e = enc.encode(["The cat sat on the mat.", "A cat was sitting on the rug.", "Interest rates rose again."])
    assert e.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_shipped_head_is_small_and_describes_itself(judge):
    # 23 rows of 18,432 float32: a pole and a gate row per dimension (issue 13: high / low / not expressed,
    # before it 9 pole rows only, under 1.1 MB) and the 5 trait rows
    assert default_head_path().stat().st_size < 1_750_000
    meta = judge.head.metadata
    assert judge.encoder_key == "mpnet" and meta["feature_dim"] == 2 * 12 * 768
    assert meta["dimensions"] == list(DIMENSIONS) and meta["training"]["l2_chosen_on"] == "validation"
    assert judge.head.form == "softmax3" and meta["format"] == 2
    assert judge.head.pole_weight.shape == judge.head.gate_weight.shape == (9, meta["feature_dim"])


def test_clearly_high_and_low_texts_score_in_the_right_direction(judge):
    texts = [t for pair in PAIRS.values() for t in pair]
    progress = []
    scores = judge.score(texts, on_progress=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (len(texts), len(texts))
    for i, trait in enumerate(PAIRS):
        high, low = scores[2 * i][trait], scores[2 * i + 1][trait]
        assert high - low > 0.3, (trait, high, low)
        assert all(-1.0 <= v <= 1.0 for v in scores[2 * i].values())
    top = judge.trait_probabilities(texts).argmax(1)
    assert [TRAITS[k] for k in top] == [t for t in PAIRS for _ in range(2)]


def test_test_split_accuracy_per_trait_matches_the_recorded_training_run(judge):
    acc = evaluate_text_judge(judge, "test")
    for trait, minimum in MIN_TEST_ACCURACY.items():
        assert acc[trait] >= minimum, (trait, acc[trait])
    recorded = judge.head.metadata["metrics"]["test"]
    for dim in DIMENSIONS:
        assert acc[dim] == pytest.approx(recorded[dim], abs=0.05), dim
    assert acc["trait_id"] >= 0.85  # measured 0.90


def test_check_set_accuracy_stays_where_it_was_measured(judge):
    acc = evaluate_on_check_set(judge)
    assert acc["big_five_mean"] >= 0.86  # measured 0.917 (pole head before issue 13: 0.904; MiniLM head: 0.783)
    assert acc["agreeableness"] >= 0.8  # measured 0.896 (before issue 13: 0.854; MiniLM head: 0.833)
    assert acc["mbti_mean"] >= 0.8  # measured 0.875
    assert all(acc[a] >= 0.7 for a in AXES)  # lowest measured 0.833


def test_the_judge_is_specific_on_the_test_split_and_the_check_set(judge):
    # Issue 13's targets; measured (docs/MEASUREMENT.md): off-target 0.046 / 0.034, max |r| 0.184 / 0.053, and the
    # pole head before issue 13: 0.657 / 0.661 and 0.748 / 0.675.
    report = specificity_report(judge)
    for name in ("test", "check"):
        got = report[name]
        assert got["pole_accuracy"]["big_five"] >= 0.9, name
        assert got["off_target_mean_abs"]["big_five"] <= 0.3, name
        assert got["intercorrelation"]["big_five"]["max_abs_off_diagonal"] <= 0.3, name
        assert got["on_target_mean_abs"]["big_five"] >= 0.3, name  # measured 0.767 / 0.420: it still reads the trait
        assert got["calibration"]["three_way_top_label"]["ece"] <= 0.1, name  # measured 0.005 / 0.035
    assert report["test"]["neutral_mean_abs"]["all"] <= 0.1  # measured 0.003


def test_degenerate_text_is_unscorable_on_the_real_judge(judge):
    texts = ["I'd LOVE to do a free-LEM-LEM-LEM-LEM-LEM-LEM-LEM-LEM",
             "interingeverse exponential precipitation hepatitisapter Ourible memorabsorption picnic eucalyptus",
             "", PAIRS["openness"][0]]
    found = judge.assess(texts)
    assert [a.unscorable for a in found] == [True, True, True, False]
    assert all(v == 0.0 for a in found[:3] for v in a.scores.values())
    assert found[3].scores["openness"] > 0.3
