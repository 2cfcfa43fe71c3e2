"""How specific the trait judge is (issue 13): on-target and off-target scores, pole accuracy, trait
intercorrelation and calibration (ECE, reliability plots) of its three-way readings on a set of texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from personaedit.eval.judge_data import HIGH, LOW, TextSet, check_texts, labels, split_texts
from personaedit.eval.text_judge import AXES, DIMENSIONS, TRAITS
from personaedit.progress import Progress

ECE_BINS = 10


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
