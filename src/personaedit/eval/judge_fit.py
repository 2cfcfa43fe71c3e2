"""Fitting the text judge: its labelled training texts, the pole heads (one L2 logistic regression per
dimension, the form before issue 13), `train_text_judge` (which fits either head form and writes the head,
optionally after a LoRA adapter on the encoder), and the pole accuracies it reports.

Only the train split is fitted; the L2 strength of each head is chosen on the validation split; the test
split and judge_check only score the result. Classes weigh equally in every fit (trait_texts holds more
agreeableness than other texts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from personaedit.data import records
from personaedit.eval import judge_training
from personaedit.eval.judge_data import split_texts
from personaedit.eval.judge_metrics import specificity
from personaedit.eval.judge_adapter import AdapterTrainer, examples, save_adapter
from personaedit.eval.judge_math import Standardiser, accuracy, balanced_weights, fit_softmax, log_softmax
from personaedit.eval.text_judge import (AXES, DIMENSIONS, HEAD_FORMS, JUDGE_ENCODER, TRAITS, JudgeHead, TextJudge,
                                         first_pole)
from personaedit.models.encoders import (ENCODERS, FEATURE_LAYERS, FEATURES, AdapterConfig, FeatureEncoder,
                                         SentenceEncoder, encoder_key)
from personaedit.persona import BIG_FIVE
from personaedit.progress import Progress

Labelled = tuple[np.ndarray, np.ndarray]  # (features [n, d], labels [n])


L2_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def big_five_rows(split: str, **where: Any) -> list[dict[str, Any]]:
    """Opinions of a split; the training split adds the training-only trait statements (trait_texts)."""
    rows = records("opinions", split, **where)
    if split == "train":
        rows += records("trait_texts", split, **where)
    return rows


def pole_texts(dimension: str, split: str) -> tuple[list[str], np.ndarray]:
    """Big Five texts or mbti_texts (MBTI) of one dimension and split; label 1 = high / first letter."""
    rows = big_five_rows(split, trait=dimension) if dimension in BIG_FIVE else \
        records("mbti_texts", split, axis=dimension)
    return [r["text"] for r in rows], np.array([r["pole"] == first_pole(dimension) for r in rows], dtype=int)


def trait_texts(split: str) -> tuple[list[str], np.ndarray]:
    """All Big Five texts of a split, labelled by the index of their trait in TRAITS."""
    rows = big_five_rows(split)
    return [r["text"] for r in rows], np.array([TRAITS.index(r["trait"]) for r in rows])


def check_texts(dimension: str) -> tuple[list[str], np.ndarray]:
    """judge_check replies of one dimension (the reply `text`, not the friend's message), labelled by pole."""
    rows = records("judge_check", trait=dimension)
    return [r["text"] for r in rows], np.array([r["pole"] == first_pole(dimension) for r in rows], dtype=int)


def encode_sets(
    sets: Mapping[Hashable, tuple[list[str], np.ndarray]], encoder: FeatureEncoder,
    on_progress: Progress | None = None,
) -> dict[Hashable, Labelled]:
    """Features for labelled text sets, each distinct text encoded once, in one batched pass."""
    unique = list(dict.fromkeys(t for texts, _ in sets.values() for t in texts))
    feats = encoder.features(unique, on_progress)
    row = {t: i for i, t in enumerate(unique)}
    return {name: (feats[[row[t] for t in texts]], labels) for name, (texts, labels) in sets.items()}


def split_sets(split: str) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per dimension its labelled pole texts, plus 'trait': the opinions labelled by trait."""
    return {**{dim: pole_texts(dim, split) for dim in DIMENSIONS}, "trait": trait_texts(split)}


def choose_l2(
    train: Labelled, validation: Labelled, n_classes: int, grid: Sequence[float] = L2_GRID,
) -> tuple[float, dict[str, list[float]]]:
    """The L2 strength with the best validation accuracy; ties go to lower validation log-loss, then stronger L2.

    Every fit weighs the classes equally (`balanced_weights`): the training texts are not spread evenly.
    """
    acc, loss = [], []
    weight = balanced_weights(train[1], n_classes)
    for l2 in grid:
        w, b = fit_softmax(*train, n_classes, l2, weight)
        log_p = log_softmax(validation[0] @ w.T + b)
        acc.append(float(np.mean(log_p.argmax(1) == validation[1])))
        loss.append(float(-np.mean(log_p[np.arange(len(validation[1])), validation[1]])))
    best = max(range(len(grid)), key=lambda i: (acc[i], -round(loss[i], 9), grid[i]))
    return grid[best], {"grid": list(grid), "validation_accuracy": acc, "validation_log_loss": loss}


def fit_head(
    train: Mapping[str, Labelled], validation: Mapping[str, Labelled], grid: Sequence[float] = L2_GRID,
    on_progress: Progress | None = None,
) -> JudgeHead:
    """Heads for every dimension and the trait softmax, each with its L2 chosen on `validation`.

    `train`/`validation` map each of DIMENSIONS (labels 1/0) and 'trait' (labels 0..4) to (features, labels).
    Features are standardised with the mean/scale of all distinct training rows, folded into the weights.
    Classes weigh equally in every fit (trait_texts adds more agreeableness than other texts).
    """
    standard = Standardiser.fit(np.unique(np.concatenate([train[k][0] for k in train]), axis=0))
    heads, chosen, trace = [], {}, {}
    tasks = [(dim, 2) for dim in DIMENSIONS] + [("trait", len(TRAITS))]
    for i, (name, k) in enumerate(tasks):
        x_tr, y_tr = standard(train[name][0]), train[name][1]
        l2, trace[name] = choose_l2((x_tr, y_tr), (standard(validation[name][0]), validation[name][1]), k, grid)
        chosen[name] = l2
        w, b = fit_softmax(x_tr, y_tr, k, l2, balanced_weights(y_tr, k))
        if k == 2:  # one logit: high pole (label 1) minus low pole
            w, b = w[1:] - w[:1], b[1:] - b[:1]
        heads.append(standard.fold(w, b))
        if on_progress is not None:
            on_progress(i + 1, len(tasks))
    pole_w = np.concatenate([w for w, _ in heads[:-1]])
    pole_b = np.concatenate([b for _, b in heads[:-1]])
    return JudgeHead(pole_w, pole_b, heads[-1][0], heads[-1][1], {"l2": chosen, "l2_selection": trace})


def pole_accuracies(head: JudgeHead, sets: Mapping[str, Labelled]) -> dict[str, float]:
    """Pole accuracy per dimension present in `sets`, the 5-way trait accuracy if 'trait' is, and means."""
    out: dict[str, float] = {}
    for i, dim in enumerate(DIMENSIONS):
        if dim in sets:
            out[dim] = accuracy(head.pole_probabilities(sets[dim][0])[:, i], sets[dim][1])
    if "trait" in sets:
        out["trait_id"] = float(np.mean(head.trait_probabilities(sets["trait"][0]).argmax(1) == sets["trait"][1]))
    for name, group in (("big_five_mean", TRAITS), ("mbti_mean", AXES)):
        present = [out[d] for d in group if d in out]
        if present:
            out[name] = float(np.mean(present))
    return out


def adapter_path_for(head_path: str | Path) -> Path:
    """Where a head's encoder adapter lives: beside it, `<stem>.adapter.safetensors`."""
    head_path = Path(head_path)
    return head_path.with_name(head_path.stem + ".adapter.safetensors")


def train_adapter(
    encoder: SentenceEncoder, config: AdapterConfig, out_path: str | Path, on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on `encoder` (changed in place), early-stopped on validation; write it to `out_path`.

    The stopping score is the temporary heads' mean Big Five pole accuracy on the validation split.
    """
    validation = split_sets("validation")

    def score(trainer: AdapterTrainer) -> float:
        right = [np.mean((trainer.predict(validation[dim][0])[0][:, DIMENSIONS.index(dim)] >= 0) == validation[dim][1])
                 for dim in TRAITS]
        return float(np.mean(right))

    trainer = AdapterTrainer(encoder, config, FEATURE_LAYERS, len(DIMENSIONS), len(TRAITS))
    trace = trainer.train(examples(split_sets("train"), DIMENSIONS, TRAITS), score, on_progress)
    save_adapter(trainer.model, out_path)
    return trace


def train_text_judge(
    out_path: str | Path, seed: int = 0, on_progress: Progress | None = None,
    encoder: FeatureEncoder | None = None, l2_grid: Sequence[float] = L2_GRID, adapter: AdapterConfig | None = None,
    encoder_name: str = JUDGE_ENCODER, form: str = "softmax3", c_grid: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Train the heads on the train split, choose regularisation on validation, write the head; return metrics.

    `form` "softmax3" (default) or "gated" trains the trait-specific head of issue 13 (eval/judge_training:
    high / low / not expressed per dimension, scikit-learn logistic regressions, C from `c_grid` chosen on
    validation, a temperature per dimension fitted on validation); "pole" the head before it (a binary
    high-vs-low regression per dimension, L2 from `l2_grid`).
    `encoder_name` (a key of ENCODERS) is the real encoder used and recorded in the head; `encoder`, if given,
    computes the features instead (tests). With `adapter`, a LoRA adapter on the real MiniLM (so `encoder_name`
    must be "minilm") is trained first (see judge_adapter), written beside
    the head as `<stem>.adapter.safetensors`, and the heads are fitted on the features of the encoder with the
    adapter merged in, exactly as `TextJudge.load` will compute them.
    Deterministic: the encoder runs in eval mode and each fit is convex, solved by L-BFGS; the adapter's
    initialisation and shuffling draw from `seed`. Same data, same machine, same file.
    """
    import torch

    if form not in HEAD_FORMS:
        raise ValueError(f"unknown judge head form {form!r}: expected one of {', '.join(HEAD_FORMS)}")
    torch.manual_seed(seed)
    key = encoder_key(encoder_name)
    adapter_meta: dict[str, Any] | None = None
    if adapter is not None:
        if encoder is not None or key != "minilm":
            raise ValueError("an encoder adapter is trained on the real all-MiniLM-L6-v2 only")
        adapter = AdapterConfig.from_json({**adapter.to_json(), "seed": seed})
        target = adapter_path_for(out_path)
        trace = train_adapter(SentenceEncoder(), adapter, target, on_progress)
        adapter_meta = {"file": target.name, "config": adapter.to_json(), "best_epoch": trace["best_epoch"],
                        "validation_by_epoch": trace["epoch_score"], "stopped_on": "validation (temporary heads)"}
        encoder = SentenceEncoder(adapter=target, adapter_config=adapter)
    encoder = encoder or SentenceEncoder(encoder=key)
    splits = ("train", "validation", "test")
    sets = {s: split_sets(s) for s in splits}
    texts = {s: split_texts(s) for s in splits}
    labelled = {(s, name): v for s in splits for name, v in sets[s].items()}
    labelled.update({(s, "all"): (texts[s].texts, np.zeros(len(texts[s]))) for s in splits})
    flat = encode_sets(labelled, encoder, on_progress)
    by_split = {s: {name: flat[(s, name)] for name in sets[s]} for s in splits}
    if form == "pole":
        head = fit_head(by_split["train"], by_split["validation"], l2_grid)
        fit_note = "L2 logistic regression (high vs low), classes weighed equally, L-BFGS from zero"
        data_note = "opinions + trait_texts (Big Five, trait softmax) and mbti_texts (axes), split=train"
    else:
        grid = tuple(c_grid) if c_grid is not None else judge_training.C_GRID
        head = judge_training.fit_specific_head((flat[("train", "all")][0], texts["train"]),
                                    (flat[("validation", "all")][0], texts["validation"]), form, grid)
        fit_note = (f"{form}: scikit-learn LogisticRegression (lbfgs), classes weighed equally, in the row space of "
                    "the standardised training features; C by balanced validation log-loss, then a temperature per "
                    "dimension on validation (folded into the weights)")
        data_note = ("per dimension: its texts high/low; the other dimensions' texts (not its MBTI/Big Five "
                     "counterpart's) and neutral_text + neutral_questions as not expressed; opinions + trait_texts + "
                     "mbti_texts, split=train; trait softmax on the Big Five texts")
    metrics: dict[str, Any] = {s: pole_accuracies(head, by_split[s]) for s in splits}
    summary = {}
    for s in ("validation", "test"):
        spec = specificity(head.class_probabilities(flat[(s, "all")][0]), texts[s])
        summary[s] = {"off_target_mean_abs": spec["off_target_mean_abs"],
                      "max_abs_r": {k: v["max_abs_off_diagonal"] for k, v in spec["intercorrelation"].items()},
                      "ece_three_way": spec["calibration"]["three_way_top_label"]["ece"]}
    metrics["specificity"] = summary
    head.metadata.update({
        "encoder": ENCODERS[key].name, "encoder_package": ENCODERS[key].pip, "features": FEATURES,
        "feature_layers": list(ENCODERS[key].feature_layers), "feature_dim": int(head.pole_weight.shape[1]),
        "training": {"data": data_note, "l2_chosen_on": "validation", "fit": fit_note, "standardised": True,
                     "seed": seed},
        "metrics": metrics,
    })
    if adapter_meta is not None:
        head.metadata["adapter"] = adapter_meta
    head.save(out_path)
    chosen = {"l2": head.metadata["l2"]} if form == "pole" else {"c": head.metadata["c"],
                                                                   "temperature": head.metadata["temperature"]}
    return {"form": form, **chosen, **({"adapter": adapter_meta} if adapter_meta else {}), **metrics}


def evaluate_text_judge(judge: TextJudge, split: str = "test", on_progress: Progress | None = None) -> dict[str, float]:
    """Pole accuracy per trait (opinions) and axis (mbti_texts) of `split`, 5-way trait accuracy, and means."""
    return pole_accuracies(judge.head, encode_sets(split_sets(split), judge.encoder, on_progress))


def evaluate_on_check_set(judge: TextJudge, on_progress: Progress | None = None) -> dict[str, float]:
    """Pole accuracy per trait and axis on judge_check (reply texts only), 5-way trait accuracy, and means."""
    sets = {dim: check_texts(dim) for dim in DIMENSIONS}
    texts = [t for dim in TRAITS for t in sets[dim][0]]
    sets["trait"] = (texts, np.repeat(np.arange(len(TRAITS)), [len(sets[d][0]) for d in TRAITS]))
    return pole_accuracies(judge.head, encode_sets(sets, judge.encoder, on_progress))
