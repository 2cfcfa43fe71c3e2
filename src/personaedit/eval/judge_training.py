"""Training and measuring the trait-specific text judge (issue 13).

Each dimension (5 Big Five traits, 4 MBTI axes) gets a three-way reading of a text: it expresses the high
pole (or first letter), the low pole (second letter), or *neither*. The score is p(high) − p(low), in
[-1, 1], near 0 when the dimension is not expressed. Two head forms are fitted and compared on validation:

- **softmax3**: a multinomial logistic regression over (high, low, none);
- **gated**: a binary "expressed" head (the dimension's texts against all others) times a binary pole head
  fitted on the dimension's texts only: p(high) = p(expressed)·p(high | expressed).

Labels of one dimension: its own texts are high/low; "none" are the texts of every *other* dimension of
either family and the neutral texts (neutral_text paragraphs, neutral_questions), except the texts of its
MBTI/Big Five counterpart (`COUNTERPART`: E/I ↔ extraversion, S/N ↔ openness, T/F ↔ agreeableness, J/P ↔
conscientiousness, the correlations McCrae & Costa reported in 1989), which are left out of that
dimension's fit altogether: a text about enjoying crowds does express E, so it may not teach the
extraversion head "not expressed".

Discipline (as before issue 13): fit on the train split (opinions + trait_texts + mbti_texts + neutral texts
of split=train); the C of each dimension (scikit-learn's inverse L2 strength) is chosen on the validation
split by class-balanced log-loss; a temperature per dimension is then fitted on the validation split
(plain log-loss, the composition of the held-out splits), and folded into the weights. The test split and
judge_check only score the result. Features are standardised on the training rows; since there are fewer
rows than features, every fit runs in the row space of the standardised training features (exact for an
L2 penalty: the optimum lies in that space) and is mapped back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.optimize

from personaedit.data import records
from personaedit.eval.judge_math import balanced_weights, softmax, three_way
from personaedit.eval.text_judge import AXES, DIMENSIONS, TRAITS, JudgeHead, first_pole
from personaedit.progress import Progress

FORMS: tuple[str, ...] = ("softmax3", "gated")
C_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HIGH, LOW, NONE = 0, 1, 2
COUNTERPART = {"extraversion": "ei", "openness": "sn", "agreeableness": "tf", "conscientiousness": "jp"}
COUNTERPART.update({axis: trait for trait, axis in list(COUNTERPART.items())})
ECE_BINS = 10


# ------------------------------------------------------------------------------------------------ data


@dataclass
class TextSet:
    """Texts with the dimension each expresses (None: neutral text) and its pole (1 = high / first letter)."""

    texts: list[str]
    dims: list[str | None]
    poles: list[int | None]

    def __add__(self, other: "TextSet") -> "TextSet":
        return TextSet(self.texts + other.texts, self.dims + other.dims, self.poles + other.poles)

    def __len__(self) -> int:
        return len(self.texts)


def _rows(rows: Sequence[Mapping[str, Any]], key: str) -> TextSet:
    dims = [r[key] for r in rows]
    return TextSet([r["text"] for r in rows], dims, [int(r["pole"] == first_pole(d)) for r, d in zip(rows, dims)])


def _neutral(split: str) -> TextSet:
    texts = [r["text"] for r in records("neutral_text", split)] + [r["question"] for r in records("neutral_questions", split)]
    return TextSet(texts, [None] * len(texts), [None] * len(texts))


def split_texts(split: str) -> TextSet:
    """Big Five texts (opinions; on train also trait_texts), mbti_texts and the neutral texts of a split."""
    big_five = records("opinions", split) + (records("trait_texts", split) if split == "train" else [])
    return _rows(big_five, "trait") + _rows(records("mbti_texts", split), "axis") + _neutral(split)


def check_texts() -> TextSet:
    """judge_check: the reply texts (not the friend's messages) of every dimension; it holds no neutral text."""
    rows = records("judge_check")
    return TextSet([r["text"] for r in rows], [r["trait"] for r in rows],
                   [int(r["pole"] == first_pole(r["trait"])) for r in rows])


def labels(dim: str, data: TextSet) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, classes HIGH/LOW/NONE) of `dim`'s three-way task; its counterpart's texts are left out."""
    rows, ys = [], []
    for i, (d, pole) in enumerate(zip(data.dims, data.poles)):
        if d == dim:
            rows.append(i)
            ys.append(HIGH if pole == 1 else LOW)
        elif d is None or d != COUNTERPART.get(dim):
            rows.append(i)
            ys.append(NONE)
    return np.array(rows, dtype=int), np.array(ys, dtype=int)


# ---------------------------------------------------------------------------------------- probabilities


# -------------------------------------------------------------------------------------------- fitting


@dataclass
class RowSpace:
    """Standardisation on the training rows and the orthonormal basis of their row space."""

    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray  # [r, d], orthonormal rows

    @classmethod
    def fit(cls, x: np.ndarray) -> "RowSpace":
        x = np.unique(np.asarray(x, dtype=np.float64), axis=0)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        _, s, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
        return cls(mean, scale, vt[s > s[0] * 1e-10])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.basis.T

    def fold(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(w', b') on raw features with w'·x + b' = w·coords(x) + b."""
        w_raw = (w @ self.basis) / self.scale
        return w_raw, b - w_raw @ self.mean


def _logistic(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="lbfgs", max_iter=10000, tol=1e-8)


def fit_logits(form: str, x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit one dimension on row-space coordinates x and classes y; return (W [2, r], b [2]): pole, gate logits.

    Every fit weighs its classes equally (balanced_weights) — the "none" class has many more texts.
    """
    if form == "softmax3":
        model = _logistic(c).fit(x, y, sample_weight=balanced_weights(y))
        z_w, z_b = model.coef_, model.intercept_  # rows in class order HIGH, LOW, NONE
        return (np.stack([z_w[HIGH] - z_w[LOW], z_w[LOW] - z_w[NONE]]),
                np.array([z_b[HIGH] - z_b[LOW], z_b[LOW] - z_b[NONE]]))
    if form == "gated":
        expressed = (y != NONE).astype(int)
        gate = _logistic(c).fit(x, expressed, sample_weight=balanced_weights(expressed, 2))
        on = y != NONE
        high = (y[on] == HIGH).astype(int)
        pole = _logistic(c).fit(x[on], high, sample_weight=balanced_weights(high, 2))
        return np.stack([pole.coef_[0], gate.coef_[0]]), np.array([pole.intercept_[0], gate.intercept_[0]])
    raise ValueError(f"unknown judge head form {form!r}")


def log_loss_3(p: np.ndarray, y: np.ndarray, balanced: bool) -> float:
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))
    if not balanced:
        return float(nll.mean())
    return float(np.mean([nll[y == k].mean() for k in np.unique(y)]))


def fit_temperature(form: str, logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the validation log-loss of three_way(form, logits / T) (logits: [n, 2])."""
    def loss(log_t: float) -> float:
        t = np.exp(log_t)
        return log_loss_3(three_way(form, logits[:, 0] / t, logits[:, 1] / t), y, balanced=False)

    result = scipy.optimize.minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


@dataclass
class FittedDimension:
    weight: np.ndarray  # [2, d] raw-feature weights (pole, gate), temperature folded in
    bias: np.ndarray  # [2]
    c: float
    temperature: float
    trace: dict[str, list[float]]


def fit_dimension(
    form: str, dim: str, space: RowSpace, train: tuple[np.ndarray, TextSet], validation: tuple[np.ndarray, TextSet],
    grid: Sequence[float],
) -> FittedDimension:
    """One dimension's head: C chosen by balanced validation log-loss, then a temperature on validation."""
    rows_tr, y_tr = labels(dim, train[1])
    rows_va, y_va = labels(dim, validation[1])
    x_tr, x_va = space(train[0][rows_tr]), space(validation[0][rows_va])
    losses, fits = [], []
    for c in grid:
        w, b = fit_logits(form, x_tr, y_tr, c)
        z = x_va @ w.T + b
        losses.append(log_loss_3(three_way(form, z[:, 0], z[:, 1]), y_va, balanced=True))
        fits.append((w, b, z))
    best = min(range(len(grid)), key=lambda i: (round(losses[i], 9), -grid[i]))
    w, b, z = fits[best]
    t = fit_temperature(form, z, y_va)
    w_raw, b_raw = space.fold(w / t, b / t)
    return FittedDimension(w_raw, b_raw, grid[best], t, {"c": list(grid), "validation_balanced_log_loss": losses})


def fit_trait_softmax(
    space: RowSpace, train: tuple[np.ndarray, TextSet], validation: tuple[np.ndarray, TextSet], grid: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, float, dict[str, list[float]]]:
    """The 5-way 'which trait' softmax on the Big Five texts; C by validation accuracy, then log-loss."""
    def xy(data: tuple[np.ndarray, TextSet]) -> tuple[np.ndarray, np.ndarray]:
        rows = [i for i, d in enumerate(data[1].dims) if d in TRAITS]
        return space(data[0][rows]), np.array([TRAITS.index(data[1].dims[i]) for i in rows])

    (x_tr, y_tr), (x_va, y_va) = xy(train), xy(validation)
    acc, loss, fits = [], [], []
    for c in grid:
        model = _logistic(c).fit(x_tr, y_tr, sample_weight=balanced_weights(y_tr, len(TRAITS)))
        p = softmax(x_va @ model.coef_.T + model.intercept_)
        acc.append(float(np.mean(p.argmax(1) == y_va)))
        loss.append(float(-np.mean(np.log(np.clip(p[np.arange(len(y_va)), y_va], 1e-12, 1)))))
        fits.append((model.coef_, model.intercept_))
    best = max(range(len(grid)), key=lambda i: (acc[i], -round(loss[i], 9), -grid[i]))
    w, b = space.fold(*fits[best])
    return w, b, grid[best], {"c": list(grid), "validation_accuracy": acc, "validation_log_loss": loss}


def fit_specific_head(
    train: tuple[np.ndarray, TextSet], validation: tuple[np.ndarray, TextSet], form: str = "softmax3",
    grid: Sequence[float] = C_GRID, on_progress: Progress | None = None,
):
    """A trait-specific JudgeHead of `form` (see the module docstring) from features and text sets."""
    space = RowSpace.fit(train[0])
    fitted = {}
    for i, dim in enumerate(DIMENSIONS):
        fitted[dim] = fit_dimension(form, dim, space, train, validation, grid)
        if on_progress is not None:
            on_progress(i + 1, len(DIMENSIONS) + 1)
    trait_w, trait_b, trait_c, trait_trace = fit_trait_softmax(space, train, validation, grid)
    if on_progress is not None:
        on_progress(len(DIMENSIONS) + 1, len(DIMENSIONS) + 1)
    weight = np.stack([fitted[d].weight for d in DIMENSIONS])  # [9, 2, d]
    bias = np.stack([fitted[d].bias for d in DIMENSIONS])
    meta = {"form": form, "c": {**{d: fitted[d].c for d in DIMENSIONS}, "trait": trait_c},
            "temperature": {d: fitted[d].temperature for d in DIMENSIONS},
            "c_selection": {**{d: fitted[d].trace for d in DIMENSIONS}, "trait": trait_trace}}
    return JudgeHead(weight[:, 0], bias[:, 0], trait_w, trait_b, meta, weight[:, 1], bias[:, 1], form)


# ------------------------------------------------------------------------------------------- metrics


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width confidence bins: Σ_b (n_b / n)·|accuracy_b − mean confidence_b|; and the bins."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    ece, table = 0.0, []
    for k in range(bins):
        inside = which == k
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.mean() * gap
            table.append({"low": float(edges[k]), "high": float(edges[k + 1]), "n": int(inside.sum()),
                          "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())})
    return float(ece), table


def specificity(probs: np.ndarray, data: TextSet) -> dict[str, Any]:
    """The issue-13 measures of a judge's three-way probabilities [n, 9, 3] on labelled texts.

    - pole accuracy: on the texts that express a dimension, the share whose score p(high) − p(low) has the
      sign of their pole (per dimension; pooled over the Big Five traits and over the MBTI axes), and their
      mean |score| (on-target: how strongly the judge reads the dimension where it is expressed);
    - off-target mean |score|: a dimension's |score| on the texts of the *other* dimensions of its family
      (the other traits for a trait, the other axes for an axis);
    - neutral mean |score| on the neutral texts (if any);
    - Pearson r between the traits' scores over all Big Five texts (and between the axes' over MBTI texts);
      the largest |r| off the diagonal;
    - calibration: the top-label confidence and correctness of the three-way reading for every labelled
      (text, dimension) pair (the same pairs as training uses), its ECE and reliability bins; and the ECE of
      p(high | expressed) = p(high) / (p(high) + p(low)) on the texts that express the dimension.
    """
    scores = probs[..., HIGH] - probs[..., LOW]
    dims = np.array([d if d is not None else "" for d in data.dims])
    poles = np.array([p if p is not None else -1 for p in data.poles])
    out: dict[str, Any] = {"pole_accuracy": {}, "on_target_mean_abs": {}, "off_target_mean_abs": {}, "n_on_target": {}}
    right_all: dict[str, list[bool]] = {"big_five": [], "mbti": []}
    off_all: dict[str, list[float]] = {"big_five": [], "mbti": []}
    on_all: dict[str, list[float]] = {"big_five": [], "mbti": []}
    conf, correct, pole_conf, pole_correct = [], [], [], []
    for j, dim in enumerate(DIMENSIONS):
        family, group = ("big_five", TRAITS) if dim in TRAITS else ("mbti", AXES)
        on = dims == dim
        right = (scores[on, j] > 0) == (poles[on] == 1)
        off = np.isin(dims, [d for d in group if d != dim])
        if on.any():
            out["pole_accuracy"][dim] = float(right.mean())
            out["on_target_mean_abs"][dim] = float(np.abs(scores[on, j]).mean())
            out["n_on_target"][dim] = int(on.sum())
            right_all[family] += right.tolist()
            on_all[family] += np.abs(scores[on, j]).tolist()
        if off.any():
            out["off_target_mean_abs"][dim] = float(np.abs(scores[off, j]).mean())
            off_all[family] += np.abs(scores[off, j]).tolist()
        rows, y = labels(dim, data)
        if len(rows):
            p = probs[rows, j]
            conf += p.max(1).tolist()
            correct += (p.argmax(1) == y).tolist()
        if on.any():
            ph = probs[on, j, HIGH] / np.clip(probs[on, j, HIGH] + probs[on, j, LOW], 1e-12, None)
            pole_conf += ph.tolist()
            pole_correct += (poles[on] == 1).tolist()
    for family in ("big_five", "mbti"):
        if right_all[family]:
            out["pole_accuracy"][family] = float(np.mean(right_all[family]))
            out["on_target_mean_abs"][family] = float(np.mean(on_all[family]))
        if off_all[family]:
            out["off_target_mean_abs"][family] = float(np.mean(off_all[family]))
            out.setdefault("off_target_share_above_0.5", {})[family] = float(np.mean(np.array(off_all[family]) > 0.5))
    neutral = dims == ""
    if neutral.any():
        out["neutral_mean_abs"] = {dim: float(np.abs(scores[neutral, j]).mean()) for j, dim in enumerate(DIMENSIONS)}
        out["neutral_mean_abs"]["all"] = float(np.abs(scores[neutral]).mean())
    out["intercorrelation"] = {}
    for family, group in (("big_five", TRAITS), ("mbti", AXES)):
        rows = np.isin(dims, group)
        if rows.sum() > 2:
            cols = [DIMENSIONS.index(d) for d in group]
            s = scores[np.ix_(rows, cols)]
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.corrcoef(s, rowvar=False)
            r = np.nan_to_num(r)
            off_diag = np.abs(r[~np.eye(len(group), dtype=bool)])
            out["intercorrelation"][family] = {"dimensions": list(group), "r": r.round(4).tolist(),
                                               "max_abs_off_diagonal": float(off_diag.max())}
    if conf:
        ece, bins = expected_calibration_error(np.array(conf), np.array(correct))
        out["calibration"] = {"three_way_top_label": {"ece": ece, "bins": bins, "n": len(conf)}}
        # binary reliability: confidence of the predicted pole (max of p, 1 − p)
        pc, pr = np.array(pole_conf), np.array(pole_correct, dtype=bool)
        top = np.maximum(pc, 1.0 - pc)
        ece_p, bins_p = expected_calibration_error(top, (pc >= 0.5) == pr)
        out["calibration"]["pole_given_expressed"] = {"ece": ece_p, "bins": bins_p, "n": len(pc)}
    return out


def reliability_plot(reports: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """A reliability diagram (PNG): per report (e.g. test split, check set) the three-way and pole readings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    titles = {"three_way_top_label": "three-way reading (high / low / none), top label",
              "pole_given_expressed": "pole given expressed, on texts of the dimension"}
    for ax, (key, title) in zip(axes, titles.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for (name, report), marker in zip(reports.items(), "os^D"):
            cal = report["calibration"][key]
            bins = cal["bins"]
            line, = ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker,
                            label=f"{name}: ECE {cal['ece']:.3f} (n={cal['n']})")
            for b in bins:  # how many (text, dimension) pairs each point stands for
                ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), textcoords="offset points", xytext=(4, -9),
                            fontsize=6, color=line.get_color())
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean confidence in bin (numbers: pairs in the bin)")
        ax.set_ylabel("share correct in bin")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ drivers


def encode(encoder: Any, sets: Mapping[str, TextSet], on_progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Features of each text set, every distinct text encoded once in one pass."""
    unique = list(dict.fromkeys(t for data in sets.values() for t in data.texts))
    feats = encoder.features(unique, on_progress)
    row = {t: i for i, t in enumerate(unique)}
    return {name: feats[[row[t] for t in data.texts]] for name, data in sets.items()}


def specificity_report(judge: Any, split: str = "test", on_progress: Progress | None = None) -> dict[str, Any]:
    """`specificity` of a TextJudge on a split ("test") and on judge_check ("check"), from one encoding pass,
    each with the 5-way trait accuracy on its Big Five texts ("trait_id")."""
    sets = {split: split_texts(split), "check": check_texts()}
    feats = encode(judge.encoder, sets, on_progress)
    out = {}
    for name, data in sets.items():
        out[name] = specificity(judge.head.class_probabilities(feats[name]), data)
        rows = [i for i, d in enumerate(data.dims) if d in TRAITS]
        predicted = judge.head.trait_probabilities(feats[name][rows]).argmax(1)
        out[name]["trait_id"] = float(np.mean(predicted == np.array([TRAITS.index(data.dims[i]) for i in rows])))
    return out


def selection_table(encoder: Any, forms: Sequence[str], grid: Sequence[float]) -> dict[str, Any]:
    """Validation-only model selection: per form, one C for every dimension and the per-dimension choice.

    For each head: mean balanced validation log-loss over the dimensions (before the temperature), and the
    validation split's pole accuracy, off-target mean |score| and largest trait intercorrelation.
    """
    sets = {"train": split_texts("train"), "validation": split_texts("validation")}
    feats = encode(encoder, sets)
    train, validation = (feats["train"], sets["train"]), (feats["validation"], sets["validation"])
    out: dict[str, Any] = {}
    for form in forms:
        for name, g in [(f"C={c:g}", (c,)) for c in grid] + [("C per dimension", tuple(grid))]:
            head = fit_specific_head(train, validation, form, g)
            spec = specificity(head.class_probabilities(validation[0]), validation[1])
            losses = [min(head.metadata["c_selection"][d]["validation_balanced_log_loss"]) for d in DIMENSIONS]
            out[f"{form} {name}"] = {
                "balanced_log_loss": float(np.mean(losses)),
                "pole_accuracy": {k: round(v, 3) for k, v in spec["pole_accuracy"].items()},
                "off_target_mean_abs": {k: round(v, 3) for k, v in spec["off_target_mean_abs"].items()},
                "neutral_mean_abs": round(spec["neutral_mean_abs"]["all"], 3),
                "max_abs_r": {k: round(v["max_abs_off_diagonal"], 3) for k, v in spec["intercorrelation"].items()},
                "ece": round(spec["calibration"]["three_way_top_label"]["ece"], 3),
                "c": head.metadata["c"], "temperature": {k: round(v, 3) for k, v in head.metadata["temperature"].items()},
            }
            print(form, name, json.dumps(out[f"{form} {name}"]["pole_accuracy"]), out[f"{form} {name}"]["off_target_mean_abs"],
                  out[f"{form} {name}"]["balanced_log_loss"], flush=True)
    return out
