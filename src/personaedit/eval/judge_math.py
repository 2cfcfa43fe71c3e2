"""The small numerical pieces of the text judge's heads: probabilities from logits, class-balanced linear
fits (multinomial logistic regression by L-BFGS), and the standardisation folded into a head's weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize


def balanced_weights(y: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Per-row weights that give every present class the same total weight; mean weight 1."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = int((counts > 0).sum())
    return len(y) / (present * np.maximum(counts, 1.0))[y]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def three_way(form: str, pole: np.ndarray, gate: np.ndarray | None) -> np.ndarray:
    """[..., 3] probabilities (high, low, none) from the two logits a head stores.

    pole: log p(high)/p(low) in every form. gate: softmax3 — log p(low)/p(none); gated — log p(expressed)/
    p(none); 'pole' (heads before issue 13) has no gate and never says "none".
    """
    pole = np.asarray(pole, dtype=np.float64)
    if form == "pole":
        p = sigmoid(pole)
        return np.stack([p, 1.0 - p, np.zeros_like(p)], -1)
    gate = np.asarray(gate, dtype=np.float64)
    if form == "softmax3":
        return softmax(np.stack([pole + gate, gate, np.zeros_like(pole)], -1))
    if form == "gated":
        expressed, high = sigmoid(gate), sigmoid(pole)
        return np.stack([expressed * high, expressed * (1.0 - high), 1.0 - expressed], -1)
    raise ValueError(f"unknown judge head form {form!r}")


def fit_softmax(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: minimise mean cross-entropy + l2/2·‖W‖² (bias free) with L-BFGS.

    `sample_weight` (default: all ones) weights each row's cross-entropy; the mean is over the weights.
    Returns (W [k, d], b [k]). Deterministic: convex, started from zero, no sampling. With more features than
    rows the optimum lies in the row space of x (the penalty is a plain L2), so the fit runs in that space.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if d > n:
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        w, b = fit_softmax(x @ vt.T, y, n_classes, l2, sample_weight)
        return w @ vt, b
    onehot = np.eye(n_classes)[np.asarray(y, dtype=int)]
    weight = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    weight = (weight / weight.sum())[:, None]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: n_classes * d].reshape(n_classes, d), theta[n_classes * d:]
        log_p = log_softmax(x @ w.T + b)
        err = (np.exp(log_p) - onehot) * weight
        loss = -(weight * onehot * log_p).sum() + 0.5 * l2 * (w * w).sum()
        return loss, np.concatenate([(err.T @ x + l2 * w).ravel(), err.sum(0)])

    result = scipy.optimize.minimize(
        loss_and_grad, np.zeros(n_classes * (d + 1)), jac=True, method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-13},
    )
    return result.x[: n_classes * d].reshape(n_classes, d), result.x[n_classes * d:]


def fit_logistic(
    x: np.ndarray, positive: np.ndarray, l2: float, sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Binary logistic regression for p(positive): a two-class softmax folded into one weight vector."""
    w, b = fit_softmax(x, np.asarray(positive, dtype=int), 2, l2, sample_weight)
    return w[1] - w[0], float(b[1] - b[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def accuracy(p_positive: np.ndarray, labels: np.ndarray) -> float:
    """Share of texts whose p(positive) ≥ 0.5 agrees with the label."""
    return float(np.mean((np.asarray(p_positive) >= 0.5).astype(int) == np.asarray(labels)))


@dataclass(frozen=True)
class Standardiser:
    """z = (x − mean) / scale, fitted on the training features and folded into the heads afterwards."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        return cls(x.mean(0), x.std(0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def fold(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(w', b') with w'·x + b' = w·z(x) + b, for w [k, d] and b [k]."""
        w_raw = w / self.scale
        return w_raw, b - w_raw @ self.mean
