"""Grouped cross-validation of one text-judge trait head over the opinions' training topics.

Folds hold out whole training topics (11 folds, every 11th topic); trait_texts rows (no topic) always
stay in training. Fits are the judge's own: standardised features, class-balanced L2 logistic
regression. Prints accuracy for: opinions alone, + the first 248 trait_texts rows, + all trait_texts,
and a learning curve (a random share of the training rows of each fold, 3 draws, seeded).
Never touches the validation or test split.
Run: python benchmarks/judge_cv.py [--trait agreeableness] [--l2 1.0] [--encoder mpnet|minilm]
(default encoder: the shipped judge's, all-mpnet-base-v2; minilm is the judge's encoder before issue 3).
"""

from __future__ import annotations

import argparse

import numpy as np

from personaedit.data import records
from personaedit.eval.judge_math import Standardiser, balanced_weights, fit_logistic, sigmoid
from personaedit.eval.text_judge import JUDGE_ENCODER, TRAITS, first_pole
from personaedit.models.encoders import ENCODERS, SentenceEncoder

FOLDS = 11
FIRST_TRAIT_TEXTS = 248  # trait_texts rows before issue 3's additions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", default="agreeableness", help="a Big Five trait, or 'all' (one encoding pass)")
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default=JUDGE_ENCODER)
    parser.add_argument("--no-curve", action="store_true", help="skip the learning curve")
    args = parser.parse_args()

    every = list(dict.fromkeys(r["text"] for name in ("opinions", "trait_texts", "mbti_texts")
                               for r in records(name, "train")))
    feats = SentenceEncoder(encoder=args.encoder).features(every)
    row = {t: i for i, t in enumerate(every)}
    standard = Standardiser.fit(np.unique(feats, axis=0))
    for trait in TRAITS if args.trait == "all" else (args.trait,):
        report(trait, feats, row, standard, args)


def report(trait: str, feats: np.ndarray, row: dict[str, int], standard: Standardiser, args: argparse.Namespace) -> None:
    """Print one trait's cross-validated accuracies (and learning curve)."""
    opinions = records("opinions", "train", trait=trait)
    extra = [(i, r) for i, r in enumerate(records("trait_texts", "train")) if r["trait"] == trait]

    def xy(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        x = standard(feats[[row[r["text"]] for r in rows]]) if rows else np.zeros((0, feats.shape[1]))
        return x, np.array([r["pole"] == first_pole(trait) for r in rows], dtype=int)

    x_op, y_op = xy(opinions)
    topics = sorted({r["topic"] for r in opinions})
    folds = [set(topics[i::FOLDS]) for i in range(FOLDS)]
    rng = np.random.default_rng(args.seed)

    def cv(extra_rows: list[dict], share: float = 1.0) -> float:
        x_ex, y_ex = xy(extra_rows)
        right = 0
        for fold in folds:
            held = np.array([r["topic"] in fold for r in opinions])
            x = np.vstack([x_op[~held], x_ex])
            y = np.concatenate([y_op[~held], y_ex])
            if share < 1.0:
                keep = rng.choice(len(y), int(len(y) * share), replace=False)
                x, y = x[keep], y[keep]
            w, b = fit_logistic(x, y, args.l2, balanced_weights(y, 2))
            right += int(np.sum((sigmoid(x_op[held] @ w + b) >= 0.5) == y_op[held]))
        return right / len(opinions)

    first = [r for i, r in extra if i < FIRST_TRAIT_TEXTS]
    everything = [r for _, r in extra]
    print(f"{trait}: grouped {FOLDS}-fold CV over {len(topics)} training topics, L2 {args.l2}, encoder {args.encoder}")
    print(f"  opinions only ({len(opinions)} rows)            {cv([]):.3f}")
    print(f"  + trait_texts rows 1-{FIRST_TRAIT_TEXTS} ({len(first)} of this trait)   {cv(first):.3f}")
    print(f"  + all trait_texts ({len(everything)} of this trait)      {cv(everything):.3f}", flush=True)
    for share in () if args.no_curve else (0.25, 0.5, 0.75):
        draws = [cv(everything, share) for _ in range(3)]
        print(f"  learning curve: {share:.0%} of the training rows   {np.mean(draws):.3f}  (draws {', '.join(f'{d:.3f}' for d in draws)})")


if __name__ == "__main__":
    main()
