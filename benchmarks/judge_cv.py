"""Grouped cross-validation of one text-judge trait head over the opinions' training topics.

Folds hold out whole training topics (11 folds, every 11th topic); trait_texts rows (no topic) always
stay in training. Fits are the judge's own: standardised features, class-balanced L2 logistic
regression. Prints accuracy for: opinions alone, + the first 248 trait_texts rows, + all trait_texts,
and a learning curve (a random share of the training rows of each fold, 3 draws, seeded).
Never touches the validation or test split. Run: python benchmarks/judge_cv.py [--trait agreeableness] [--l2 1.0]
"""

from __future__ import annotations

import argparse

import numpy as np

from personaedit.data import records
from personaedit.eval.text_judge import (
    SentenceEncoder, Standardiser, balanced_weights, first_pole, fit_logistic, sigmoid,
)

FOLDS = 11
FIRST_TRAIT_TEXTS = 248  # trait_texts rows before issue 3's additions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", default="agreeableness")
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    opinions = records("opinions", "train", trait=args.trait)
    extra = [(i, r) for i, r in enumerate(records("trait_texts", "train")) if r["trait"] == args.trait]
    every = [r["text"] for name in ("opinions", "trait_texts", "mbti_texts") for r in records(name, "train")]
    encoder = SentenceEncoder()
    feats = encoder.features(list(dict.fromkeys(every)))
    row = {t: i for i, t in enumerate(dict.fromkeys(every))}
    standard = Standardiser.fit(np.unique(feats, axis=0))

    def xy(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        x = standard(feats[[row[r["text"]] for r in rows]]) if rows else np.zeros((0, feats.shape[1]))
        return x, np.array([r["pole"] == first_pole(args.trait) for r in rows], dtype=int)

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
    print(f"{args.trait}: grouped {FOLDS}-fold CV over {len(topics)} training topics, L2 {args.l2}")
    print(f"  opinions only ({len(opinions)} rows)            {cv([]):.3f}")
    print(f"  + trait_texts rows 1-{FIRST_TRAIT_TEXTS} ({len(first)} of this trait)   {cv(first):.3f}")
    print(f"  + all trait_texts ({len(everything)} of this trait)      {cv(everything):.3f}")
    for share in (0.25, 0.5, 0.75):
        draws = [cv(everything, share) for _ in range(3)]
        print(f"  learning curve: {share:.0%} of the training rows   {np.mean(draws):.3f}  (draws {', '.join(f'{d:.3f}' for d in draws)})")


if __name__ == "__main__":
    main()
