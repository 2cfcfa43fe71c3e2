"""Compare text-judge feature variants (encoder, layers, pooling) on the validation split and grouped CV.

For each variant: the judge's own heads fitted on the training split with L2 chosen per head on the
validation split (`fit_head`, as `personaedit judge train` does) and their validation pole accuracy; and
the grouped 11-fold cross-validation of benchmarks/judge_cv.py (training topics only, all trait_texts kept
in training) at each L2 given. Never scores the test split or the check set (use `personaedit judge
evaluate` on a trained head for those). The pooled hidden states of every layer are cached per encoder
under --cache, so variants of one encoder cost one encoding pass (MPNet: ~3 min on one thread).

A variant is ENCODER:LAYERS:POOL joined with '+' for concatenations, e.g. `mpnet:1-12:mm` (the shipped
judge: mean and max of layers 1-12), `minilm:1-6:mm` (the judge before issue 3), `mpnet:12:mean` (the
usual sentence embedding), `minilm:1-6:mm+mpnet:1-12:mm`.
Run: python benchmarks/judge_encoders.py mpnet:1-12:mm,minilm:1-6:mm [--l2 0.1,1,10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from personaedit.data import records
from personaedit.eval.judge_fit import encode_sets, fit_head, pole_accuracies, split_sets
from personaedit.eval.judge_math import Standardiser, balanced_weights, fit_logistic, sigmoid
from personaedit.eval.text_judge import AXES, TRAITS, first_pole
from personaedit.models.encoders import SentenceEncoder

FOLDS = 11


def texts() -> list[str]:
    """Every Big Five and MBTI text of the train and validation splits."""
    rows = [r for s in ("train", "validation") for n in ("opinions", "trait_texts", "mbti_texts") for r in records(n, s)]
    return list(dict.fromkeys(r["text"] for r in rows))


def pooled(encoder: str, cache: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Masked mean and max of every layer's states for texts(), cached in `cache`."""
    path = cache / f"{encoder}.npz"
    all_texts = texts()
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if list(z["texts"]) == all_texts:
            return {t: i for i, t in enumerate(all_texts)}, z["means"], z["maxes"]
    means, maxes = SentenceEncoder(encoder=encoder)._pooled(all_texts, None)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, texts=np.array(all_texts), means=means, maxes=maxes)
    return {t: i for i, t in enumerate(all_texts)}, means, maxes


class Variant:
    """Features of one variant, served from the cached pooled states (a FeatureEncoder)."""

    def __init__(self, spec: str, cache: Path) -> None:
        blocks, self.row = [], None
        for part in spec.split("+"):
            encoder, layers, pool = part.split(":")
            low, _, high = layers.partition("-")
            row, means, maxes = pooled(encoder, cache)
            self.row = self.row or row
            for layer in range(int(low), int(high or low) + 1):
                blocks += [means[:, layer]] + ([maxes[:, layer]] if pool == "mm" else [])
        self.feats = np.concatenate([b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12) for b in blocks], 1)

    def features(self, texts: list[str], on_progress: object = None) -> np.ndarray:
        return self.feats[[self.row[t] for t in texts]]


def validation_accuracy(variant: Variant) -> dict[str, float]:
    sets = {s: split_sets(s) for s in ("train", "validation")}
    flat = encode_sets({(s, n): v for s in sets for n, v in sets[s].items()}, variant)
    by = {s: {n: flat[(s, n)] for n in sets[s]} for s in sets}
    return pole_accuracies(fit_head(by["train"], by["validation"]), by["validation"])


def grouped_cv(variant: Variant, trait: str, l2s: list[float]) -> dict[float, float]:
    """judge_cv.py's '+ all trait_texts' accuracy of one trait, per L2."""
    opinions = records("opinions", "train", trait=trait)
    extra = [r for r in records("trait_texts", "train") if r["trait"] == trait]
    train_texts = list(dict.fromkeys(r["text"] for n in ("opinions", "trait_texts", "mbti_texts") for r in records(n, "train")))
    standard = Standardiser.fit(np.unique(variant.features(train_texts), axis=0))

    def xy(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        x = standard(variant.features([r["text"] for r in rows]))
        return x, np.array([r["pole"] == first_pole(trait) for r in rows], dtype=int)

    (x_op, y_op), (x_ex, y_ex) = xy(opinions), xy(extra)
    topics = sorted({r["topic"] for r in opinions})
    out = {}
    for l2 in l2s:
        right = 0
        for fold in (set(topics[i::FOLDS]) for i in range(FOLDS)):
            held = np.array([r["topic"] in fold for r in opinions])
            x, y = np.vstack([x_op[~held], x_ex]), np.concatenate([y_op[~held], y_ex])
            w, b = fit_logistic(x, y, l2, balanced_weights(y, 2))
            right += int(np.sum((sigmoid(x_op[held] @ w + b) >= 0.5) == y_op[held]))
        out[l2] = right / len(opinions)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="comma-separated variants, e.g. mpnet:1-12:mm,minilm:1-6:mm")
    parser.add_argument("--l2", default="1.0", help="comma-separated L2 strengths for the cross-validation")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/personaedit-judge-features"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    l2s = [float(v) for v in args.l2.split(",")]
    for spec in args.variants.split(","):
        variant = Variant(spec, args.cache)
        v = validation_accuracy(variant)
        print(f"{spec} ({variant.feats.shape[1]} features)")
        print("  validation  " + " ".join(f"{t[0].upper()}{100 * v[t]:.0f}" for t in TRAITS)
              + "  axes " + " ".join(f"{a}{100 * v[a]:.1f}" for a in AXES) + f"  which-trait {100 * v['trait_id']:.0f}")
        cv = {t: grouped_cv(variant, t, l2s) for t in TRAITS}
        for l2 in l2s:
            print(f"  CV L2 {l2:<5g} " + " ".join(f"{t[0].upper()}{100 * cv[t][l2]:.1f}" for t in TRAITS)
                  + f"  mean {100 * np.mean([cv[t][l2] for t in TRAITS]):.1f}", flush=True)


if __name__ == "__main__":
    main()
