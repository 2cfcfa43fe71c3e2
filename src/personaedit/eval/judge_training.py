"""Training the trait-specific text judge (issue 13); its texts and labels are in judge_data.py, how its
readings are measured in judge_metrics.py.

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
from typing import Any, Sequence

import numpy as np
import scipy.optimize

from personaedit.eval.judge_data import HIGH, LOW, NONE, TextSet, labels, split_texts
from personaedit.eval.judge_math import balanced_weights, softmax, three_way
from personaedit.eval.judge_metrics import encode, specificity
from personaedit.eval.judge_metrics import reliability_plot, specificity_report  # noqa: F401 - where scripts import them
from personaedit.eval.text_judge import DIMENSIONS, TRAITS, JudgeHead
from personaedit.progress import Progress

FORMS: tuple[str, ...] = ("softmax3", "gated")
C_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


# ------------------------------------------------------------------------------------------ drivers


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
