"""The offline text judge: a frozen sentence encoder's features (models/encoders.py) and small linear heads
on them, and how it scores a text.

The encoder is all-mpnet-base-v2 (default) or all-MiniLM-L6-v2; a head names its encoder in its metadata.
On the project's data, intermediate layers and max pooling separate the poles better than the sentence
embedding alone, and MPNet's features better than MiniLM's (docs/MEASUREMENT.md); lexicon features
(empath, VADER) added nothing.

Per Big Five trait and MBTI axis a head reads high pole / low pole / not expressed (`form`, see JudgeHead);
a text's score on a dimension is p(high or first letter) − p(low or second letter), in [-1, 1]. A softmax
over the five traits says which trait a text expresses (PersonalityEdit's Acc and TPEI). How the heads
are fitted: eval/judge_fit.py (and eval/judge_training.py for the trait-specific forms of issue 13).

A head trained with a LoRA adapter on the encoder (`personaedit judge train --adapter`) names the adapter
file in its metadata, and the judge that loads it merges the adapter into the encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from personaedit.errors import InputFileError
from personaedit.eval import degenerate
from personaedit.eval.judge_math import log_softmax, sigmoid, three_way
from personaedit.fileio import atomic_path, write_json_atomic
from personaedit.models.encoders import ENCODER_NAME, AdapterConfig, FeatureEncoder, SentenceEncoder, encoder_key
from personaedit.persona import BIG_FIVE, MBTI
from personaedit.progress import Progress

TRAITS: tuple[str, ...] = tuple(BIG_FIVE)
AXES: tuple[str, ...] = tuple(MBTI)
DIMENSIONS: tuple[str, ...] = TRAITS + AXES
HEAD_FORMAT = 2  # 1: pole heads before issue 13 (no gate); still read
HEAD_FORMS = ("pole", "softmax3", "gated")


# ---------------------------------------------------------------------------------------------- encoder


JUDGE_ENCODER = "mpnet"  # the shipped head's


# ------------------------------------------------------------------------------------- linear models


# ---------------------------------------------------------------------------------------------- head


@dataclass
class JudgeHead:
    """Linear heads on the judge features: per dimension (DIMENSIONS order) a pole logit, and since issue 13 a
    gate logit, so that the head reads high / low / not expressed; plus a 5-way trait softmax.

    `form` says how the logits make the three-way probabilities (eval/judge_math.three_way):
    "softmax3" and "gated" are trait-specific (scores near 0 for text that does not express a dimension);
    "pole" is the head before issue 13 (format 1, no gate): a score of 2·p(high) − 1 for any text.
    """

    pole_weight: np.ndarray  # [9, d]: log p(high) / p(low) (first letter / second letter)
    pole_bias: np.ndarray  # [9]
    trait_weight: np.ndarray  # [5, d]: logits over TRAITS
    trait_bias: np.ndarray  # [5]
    metadata: dict[str, Any] = field(default_factory=dict)
    gate_weight: np.ndarray | None = None  # [9, d]: softmax3 log p(low)/p(none); gated log p(expressed)/p(none)
    gate_bias: np.ndarray | None = None  # [9]
    form: str = "pole"

    def pole_probabilities(self, features: np.ndarray) -> np.ndarray:
        """p(high pole or first letter | the dimension is expressed) per text and dimension, [n, 9]."""
        return sigmoid(np.asarray(features, dtype=np.float64) @ self.pole_weight.T + self.pole_bias)

    def class_probabilities(self, features: np.ndarray) -> np.ndarray:
        """[n, 9, 3]: p(high), p(low), p(not expressed) per text and dimension."""
        x = np.asarray(features, dtype=np.float64)
        gate = None if self.gate_weight is None else x @ self.gate_weight.T + self.gate_bias
        return three_way(self.form, x @ self.pole_weight.T + self.pole_bias, gate)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """[n, 9] scores p(high) − p(low) in [-1, 1]."""
        p = self.class_probabilities(features)
        return np.clip(p[..., 0] - p[..., 1], -1.0, 1.0)

    def trait_probabilities(self, features: np.ndarray) -> np.ndarray:
        """p(the text expresses trait t) over TRAITS, [n, 5]."""
        return np.exp(log_softmax(np.asarray(features, dtype=np.float64) @ self.trait_weight.T + self.trait_bias))

    def save(self, path: str | Path) -> None:
        """Write `path` (.safetensors) and its metadata beside it (.json), both atomically."""
        path = Path(path)
        tensors = {
            "pole_weight": self.pole_weight, "pole_bias": self.pole_bias,
            "trait_weight": self.trait_weight, "trait_bias": self.trait_bias,
        }
        if self.form != "pole":
            tensors.update(gate_weight=self.gate_weight, gate_bias=self.gate_bias)
        meta = {**self.metadata, "format": HEAD_FORMAT if self.form != "pole" else 1, "form": self.form,
                "dimensions": list(DIMENSIONS), "traits": list(TRAITS)}
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
        write_json_atomic(path.with_suffix(".json"), meta)

    @classmethod
    def load(cls, path: str | Path) -> "JudgeHead":
        """Read a head written by `save` (either format); a missing or foreign file is an InputFileError."""
        path = Path(path)
        try:
            t = load_file(str(path))
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError, SafetensorError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputFileError(f"cannot read text-judge head {path}: {reason}") from None
        form = meta.get("form", "pole")
        needed = {"pole_weight", "pole_bias", "trait_weight", "trait_bias"} | (set() if form == "pole" else {"gate_weight", "gate_bias"})
        shapes_ok = (
            form in HEAD_FORMS and needed <= set(t)
            and t["pole_weight"].shape[0] == len(DIMENSIONS) and t["trait_weight"].shape[0] == len(TRAITS)
            and (form == "pole" or t["gate_weight"].shape == t["pole_weight"].shape)
        )
        if meta.get("dimensions") != list(DIMENSIONS) or not shapes_ok:
            raise InputFileError(f"{path} is not a text-judge head for {', '.join(DIMENSIONS)}")
        as64 = {k: v.astype(np.float64) for k, v in t.items()}
        return cls(as64["pole_weight"], as64["pole_bias"], as64["trait_weight"], as64["trait_bias"], meta,
                   as64.get("gate_weight"), as64.get("gate_bias"), form)


def default_head_path() -> Path:
    """The head shipped with personaedit."""
    return Path(str(resources.files("personaedit.data") / "resources" / "text_judge_head.safetensors"))


# ----------------------------------------------------------------------------------------------- judge


class TextJudge:
    """Scores texts on the Big Five traits and MBTI axes in [-1, 1] (positive = high pole / first letter)."""

    def __init__(self, head: JudgeHead, encoder: FeatureEncoder | None = None, adapter: Path | None = None) -> None:
        self.head = head
        self._encoder = encoder
        self.adapter = adapter  # LoRA weights merged into MiniLM (heads trained with an adapter)
        # The head's encoder (heads from before issue 3 name MiniLM); checked now so a foreign head fails early.
        self.encoder_key = encoder_key(head.metadata.get("encoder", ENCODER_NAME))

    @classmethod
    def load(cls, path: str | Path | None = None, encoder: FeatureEncoder | None = None) -> "TextJudge":
        """The judge with the head at `path` (default: the one shipped with personaedit) and its adapter, if any."""
        path = Path(path if path is not None else default_head_path())
        head = JudgeHead.load(path)
        adapter = head.metadata.get("adapter")
        adapter_path = path.with_name(adapter["file"]) if adapter else None
        if adapter_path is not None and not adapter_path.is_file():
            raise InputFileError(f"{path} was trained with the encoder adapter {adapter_path}, which is missing")
        return cls(head, encoder, adapter_path)

    @property
    def encoder(self) -> FeatureEncoder:
        if self._encoder is None:
            config = AdapterConfig.from_json(self.head.metadata["adapter"]["config"]) if self.adapter else None
            self._encoder = SentenceEncoder(adapter=self.adapter, adapter_config=config, encoder=self.encoder_key)
        return self._encoder

    def features(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray:
        return self.encoder.features(list(texts), on_progress)

    def assess(self, texts: Sequence[str], on_progress: Progress | None = None) -> list[Assessment]:
        """One Assessment per text: its scores, and whether it is unscorable (eval/degenerate.py).

        Unscorable texts (empty, under four words, loops, gibberish) are not encoded and score 0 on every
        dimension; the others get {dimension: p(high) − p(low)} from the head.
        """
        texts = list(texts)
        checks = [degenerate.assess(t) for t in texts]
        keep = [i for i, c in enumerate(checks) if not c.unscorable]
        skipped = len(texts) - len(keep)
        progress = None if on_progress is None else (lambda done, _: on_progress(skipped + done, len(texts)))
        rows = scores_from_features(self.head, self.features([texts[i] for i in keep], progress)) if keep else []
        if on_progress is not None and not keep:
            on_progress(len(texts), len(texts))
        out = [Assessment(dict.fromkeys(DIMENSIONS, 0.0), True, c.reasons) for c in checks]
        for i, row in zip(keep, rows):
            out[i] = Assessment(row, False, ())
        return out

    def score(self, texts: Sequence[str], on_progress: Progress | None = None) -> list[dict[str, float]]:
        """One dict per text: {dimension: p(high) − p(low)} for the 5 traits and 4 axes; 0 for unscorable texts."""
        return [a.scores for a in self.assess(texts, on_progress)]

    def trait_probabilities(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray:
        """[n, 5] probabilities of which Big Five trait each text expresses (columns in TRAITS order)."""
        return self.head.trait_probabilities(self.features(texts, on_progress))


@dataclass(frozen=True)
class Assessment:
    """The judge's reading of one text: scores in [-1, 1] per dimension, or unscorable (then all 0) and why."""

    scores: dict[str, float]
    unscorable: bool
    reasons: tuple[str, ...] = ()


def scores_from_features(head: JudgeHead, features: np.ndarray) -> list[dict[str, float]]:
    """The judge's scores for texts whose features are already computed (no unscorable check)."""
    return [dict(zip(DIMENSIONS, map(float, row))) for row in head.scores(features)]


# ------------------------------------------------------------------------------------------------ data


def first_pole(dimension: str) -> str:
    """'high' for a Big Five trait, the first letter for an MBTI axis."""
    return BIG_FIVE[dimension].high.name if dimension in BIG_FIVE else MBTI[dimension].high.name


# -------------------------------------------------------------------------------------------- training


# ----------------------------------------------------------------------------------------- evaluation


