"""Choosing the text judge's encoder adapter: validation split and grouped cross-validation over training topics.

`--mode validation`: train the adapter on the train split (as `personaedit judge train` does), print the
temporary heads' validation accuracy per epoch, then refit the judge's heads (L2 chosen on validation) on the
adapted features of the best epoch and print validation accuracy per dimension.
`--mode cv`: 11 folds over the 44 opinion topics of the train split (every 11th topic held out); trait_texts
and mbti_texts always stay in training; no early stopping (fixed epochs); per epoch, held-out opinion accuracy
per trait from the temporary heads and from a refitted L2 logistic head per trait (l2 = --l2, as judge_cv.py).
Never touches the test split or judge_check; cv mode does not touch the validation split either.
Run: python benchmarks/judge_adapter_cv.py --mode cv [--rank 4 --lr 1e-3 --epochs 4 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from personaedit.data import records
from personaedit.eval.judge_adapter import AdapterTrainer, examples
from personaedit.models.encoders import AdapterConfig
from personaedit.eval.judge_fit import fit_head, pole_accuracies, split_sets
from personaedit.eval.judge_math import Standardiser, balanced_weights, fit_logistic, sigmoid
from personaedit.eval.text_judge import DIMENSIONS, TRAITS, first_pole
from personaedit.models.encoders import FEATURE_LAYERS, SentenceEncoder

FOLDS = 11


def big_five_accuracy(trainer: AdapterTrainer, sets: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, float]:
    """Temporary heads' pole accuracy per trait on labelled sets."""
    out = {}
    for dim in TRAITS:
        texts, labels = sets[dim]
        if len(texts):
            logits, _ = trainer.predict(texts)
            out[dim] = float(np.mean((logits[:, DIMENSIONS.index(dim)] >= 0).astype(int) == labels))
    return out


def run_validation(encoder: Any, cfg: AdapterConfig) -> dict[str, Any]:
    train, validation = split_sets("train"), split_sets("validation")
    trainer = AdapterTrainer(encoder, cfg, FEATURE_LAYERS, len(DIMENSIONS), len(TRAITS))
    per_epoch: list[dict[str, float]] = []

    def score(t: AdapterTrainer) -> float:
        acc = big_five_accuracy(t, validation)
        per_epoch.append(acc)
        return float(np.mean(list(acc.values())))

    trace = trainer.train(examples(train, DIMENSIONS, TRAITS), score)
    feats = {}
    for split, sets in (("train", train), ("validation", validation)):
        unique = list(dict.fromkeys(t for texts, _ in sets.values() for t in texts))
        x = trainer.features(unique)
        row = {t: i for i, t in enumerate(unique)}
        feats[split] = {k: (x[[row[t] for t in texts]], y) for k, (texts, y) in sets.items()}
    head = fit_head(feats["train"], feats["validation"])
    return {"temporary_heads_validation": per_epoch, "best_epoch": trace["best_epoch"],
            "loss": trace["epoch_loss"], "refit_validation": pole_accuracies(head, feats["validation"]),
            "l2": head.metadata["l2"]}


def run_cv(encoder_factory: Any, cfg: AdapterConfig, l2: float) -> dict[str, Any]:
    opinions = records("opinions", "train")
    topics = sorted({r["topic"] for r in opinions})
    extra = {dim: split_sets("train")[dim] for dim in DIMENSIONS}  # opinions are removed per fold below
    right = np.zeros((cfg.epochs + 1, 3, len(TRAITS)))  # epoch, (temporary, refit, their mean p), trait
    count = np.zeros(len(TRAITS))
    for f in range(FOLDS):
        held_topics = set(topics[f::FOLDS])
        held = [r for r in opinions if r["topic"] in held_topics]
        held_text = {r["text"] for r in held}
        train = {dim: ([t for t in texts if t not in held_text], labels[[t not in held_text for t in texts]])
                 for dim, (texts, labels) in extra.items()}
        test = {dim: ([r["text"] for r in held if r["trait"] == dim],
                      np.array([r["pole"] == first_pole(dim) for r in held if r["trait"] == dim], dtype=int))
                for dim in TRAITS}
        count += [len(test[d][0]) for d in TRAITS]
        trainer = AdapterTrainer(encoder_factory(), cfg, FEATURE_LAYERS, len(DIMENSIONS), len(TRAITS))
        epoch = [0]

        def score(t: AdapterTrainer) -> float:
            for i, dim in enumerate(TRAITS):
                texts, y = test[dim]
                logits, _ = t.predict(texts)
                p_temporary = sigmoid(logits[:, DIMENSIONS.index(dim)])
                x_tr = t.features(train[dim][0])
                standard = Standardiser.fit(x_tr)
                w, b = fit_logistic(standard(x_tr), train[dim][1], l2, balanced_weights(train[dim][1], 2))
                p_refit = sigmoid(standard(t.features(texts)) @ w + b)
                for k, p in enumerate((p_temporary, p_refit, (p_temporary + p_refit) / 2)):
                    right[epoch[0], k, i] += np.sum((p >= 0.5) == y)
            epoch[0] += 1
            return float(epoch[0])  # later epochs always "better": no early stopping inside CV

        trainer.train(examples(train, DIMENSIONS, TRAITS), score)
    acc = right / count
    return {"temporary": {e: dict(zip(TRAITS, acc[e, 0].round(3).tolist())) for e in range(cfg.epochs + 1)},
            "refit": {e: dict(zip(TRAITS, acc[e, 1].round(3).tolist())) for e in range(cfg.epochs + 1)},
            "mean_p": {e: dict(zip(TRAITS, acc[e, 2].round(3).tolist())) for e in range(cfg.epochs + 1)}}


def main(encoder_factory: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("validation", "cv"), default="cv")
    parser.add_argument("--rank", type=int, default=AdapterConfig.rank)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--targets", default=",".join(AdapterConfig.targets))
    parser.add_argument("--lr", type=float, default=AdapterConfig.lr)
    parser.add_argument("--head-lr", type=float, default=AdapterConfig.head_lr)
    parser.add_argument("--head-l2", type=float, default=AdapterConfig.head_l2)
    parser.add_argument("--epochs", type=int, default=AdapterConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=AdapterConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = AdapterConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank, targets=tuple(args.targets.split(",")),
                        lr=args.lr, head_lr=args.head_lr, head_l2=args.head_l2, epochs=args.epochs,
                        batch_size=args.batch_size, seed=args.seed)
    factory = encoder_factory or (lambda: SentenceEncoder(device=args.device))
    start = time.time()
    result = run_validation(factory(), cfg) if args.mode == "validation" else run_cv(factory, cfg, args.l2)
    print(json.dumps({"config": cfg.to_json(), "mode": args.mode, "seconds": round(time.time() - start, 1),
                      **result}))


if __name__ == "__main__":
    main()
