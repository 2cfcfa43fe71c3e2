"""Integration tests of the shipped text judge on its real encoder (all-mpnet-base-v2 wheels) and of MiniLM."""

import numpy as np
import pytest

from personaedit.eval.text_judge import (
    AXES, DIMENSIONS, TRAITS, SentenceEncoder, TextJudge, default_head_path, evaluate_on_check_set,
    evaluate_text_judge,
)

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

# Measured with the shipped head (see its .json metadata: 1.0, 0.95, 1.0, 0.9, 1.0) minus two texts (0.1).
MIN_TEST_ACCURACY = {"openness": 0.9, "conscientiousness": 0.85, "extraversion": 0.9, "agreeableness": 0.8,
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
    assert default_head_path().stat().st_size < 1_100_000  # 14 rows of 18,432 float32
    meta = judge.head.metadata
    assert judge.encoder_key == "mpnet" and meta["feature_dim"] == 2 * 12 * 768
    assert meta["dimensions"] == list(DIMENSIONS) and meta["training"]["l2_chosen_on"] == "validation"
    assert judge.head.pole_weight.shape == (9, meta["feature_dim"])


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
    assert acc["big_five_mean"] >= 0.86  # measured 0.904 (MiniLM head: 0.783)
    assert acc["agreeableness"] >= 0.8  # measured 0.854 (MiniLM head: 0.833)
    assert acc["mbti_mean"] >= 0.8  # measured 0.844
    assert all(acc[a] >= 0.7 for a in AXES)  # lowest measured 0.792
