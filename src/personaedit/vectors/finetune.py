"""A fine-tuned model as a personality vector: φ = θ_finetuned − θ_base, read tensor by tensor (large tensors in
blocks of rows), so neither model is ever whole in memory.

The result is the folder `vector train` writes after full fine-tuning: a WeightEdit with method "vector" and
one dense `{parameter}.delta` per parameter that changed, named as the base model names its parameters, with
the base model's fingerprint (computed from its checkpoint as `load_model` would), so `merge --vector`, `export`,
`--edit` and `vector info` take it like any other vector. The two models must share their architecture:
the same `model_type` and sizes in config.json, the same tensor names and shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.edits.base import EDIT_JSON, FORMAT, TENSORS_FILE, _refuse_foreign_folder
from personaedit.errors import EditError, PersonaEditError
from personaedit.fileio import atomic_dir
from personaedit.merge.engine import BLOCK_ELEMENTS, Checkpoint, loaded_names, match_keys, model_folder
from personaedit.merge.tensorfile import DTYPES, FLOAT_CODES, SafetensorsWriter
from personaedit.models.arch import Architecture
from personaedit.persona import Persona
from personaedit.progress import Progress

STORE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SIZES = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
          "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "head_dim")


@dataclass(frozen=True)
class FinetuneVector:
    out: Path
    parameters: int
    changed: int
    norm: float
    bytes: int
    seconds: float

    def line(self) -> str:
        from personaedit.export.base import human_size

        return (f"wrote personality vector {self.out} ({self.changed} of {self.parameters} parameters changed, "
                f"norm {self.norm:.4g}, {human_size(self.bytes)}) in {self.seconds:.1f} s")


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersonaEditError(f"cannot read {folder / 'config.json'}: {exc}") from None


def _check_same_architecture(base: str, finetuned: str, base_cfg: dict, tuned_cfg: dict) -> None:
    for key in _SIZES:
        if key in base_cfg or key in tuned_cfg:
            if base_cfg.get(key) != tuned_cfg.get(key):
                raise EditError(f"--finetuned {finetuned} is not a fine-tune of --base {base}: {key} is "
                                f"{tuned_cfg.get(key)!r} there and {base_cfg.get(key)!r} in the base")


def _blocks(shape: tuple[int, ...], block_elements: int) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, block_elements // per_row)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _read(checkpoint: Checkpoint, key: str, rows: tuple[int, int]) -> torch.Tensor:
    reader = checkpoint.where[key]
    if not reader.tensors[key].shape:
        return reader.read(key).reshape(1)
    return reader.read_rows(key, *rows)


def _difference(base: Checkpoint, tuned: Checkpoint, key: str, rows: tuple[int, int]) -> torch.Tensor:
    work = torch.float64 if base.info(key).dtype == "F64" else torch.float32
    return _read(tuned, key, rows).to(work) - _read(base, key, rows).to(work)


def _sample(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """The first and last 64 values of a tensor, as `model_fingerprint` samples a parameter."""
    shape = checkpoint.info(key).shape
    if not shape:
        flat = checkpoint.where[key].read(key).reshape(-1)
        return torch.cat([flat[:64], flat[-64:]])
    rows, per_row = shape[0], max(1, math.prod(shape[1:]))
    need = min(rows, math.ceil(64 / per_row))
    head = checkpoint.where[key].read_rows(key, 0, need).reshape(-1)[:64]
    tail = checkpoint.where[key].read_rows(key, rows - need, rows).reshape(-1)[-64:]
    return torch.cat([head, tail])


def checkpoint_fingerprint(model: torch.nn.Module, checkpoint: Checkpoint, keys: dict[str, str]) -> str | None:
    """`personaedit.models.loading.model_fingerprint` of the model a checkpoint loads into, from a meta-device
    `model` (names, shapes, config) and samples read from the checkpoint; None when a parameter has no tensor."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    for name, param in sorted(model.named_parameters()):
        if name not in keys:
            return None
        sample = _sample(checkpoint, keys[name]).to(torch.bfloat16).to(torch.float32)
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def vector_from_finetune(base: str, finetuned: str, out: str | Path, *, dtype: str = "float32", persona: str | None = None,
                         block_elements: int = BLOCK_ELEMENTS, on_progress: Progress | None = None
                         ) -> FinetuneVector:
    """Write φ = θ_finetuned − θ_base into `out` as a personality vector (deltas stored as `dtype`)."""
    from personaedit.export.base import size_of, skeleton

    start = time.perf_counter()
    out = Path(out)
    if dtype not in STORE:
        raise PersonaEditError(f"unknown dtype {dtype!r} (valid: {', '.join(STORE)})")
    _refuse_foreign_folder(out)
    target = Persona.parse(persona) if persona else None
    base_folder, tuned_folder = model_folder(base), model_folder(finetuned)
    if base_folder.resolve() == tuned_folder.resolve():
        raise PersonaEditError(f"--base and --finetuned are the same model ({base_folder})")
    _check_same_architecture(base, finetuned, _config(base_folder), _config(tuned_folder))
    base_ckpt, tuned_ckpt = Checkpoint(base_folder), Checkpoint(tuned_folder)
    try:
        missing = sorted(set(base_ckpt.where) - set(tuned_ckpt.where))
        extra = sorted(set(tuned_ckpt.where) - set(base_ckpt.where))
        for names, phrase in ((missing, "lacks {}, which the base has"), (extra, "has {}, which the base lacks")):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise EditError(f"--finetuned {finetuned} " + phrase.format(shown) + ": not the same architecture")
        for key in base_ckpt.where:
            if tuple(base_ckpt.info(key).shape) != tuple(tuned_ckpt.info(key).shape):
                raise EditError(f"tensor {key} has shape {tuple(tuned_ckpt.info(key).shape)} in --finetuned and "
                                f"{tuple(base_ckpt.info(key).shape)} in --base")
        model, _ = skeleton(str(base_folder))
        params = dict(model.named_parameters())
        keys = match_keys(list(params), loaded_names(base_folder, list(base_ckpt.where)))  # parameter -> checkpoint key
        changed: list[str] = []
        norm2 = 0.0
        for done, (name, key) in enumerate(sorted(keys.items()), 1):
            if base_ckpt.info(key).dtype in FLOAT_CODES:
                squares = sum(float(_difference(base_ckpt, tuned_ckpt, key, rows).pow(2).sum())
                              for rows in _blocks(base_ckpt.info(key).shape, block_elements))
                if squares > 0:
                    changed.append(name)
                    norm2 += squares
            if on_progress:
                on_progress(done, 2 * len(keys))
        if not changed:
            raise PersonaEditError(f"--finetuned {finetuned} has the same weights as --base {base}: nothing to save")
        arch = Architecture(model)
        fingerprint = checkpoint_fingerprint(model, base_ckpt, keys)
        info = None if fingerprint is None else BaseModelInfo(fingerprint, base, arch.model_type, arch.num_layers,
                                                              arch.hidden_size, arch.mlp_size)
        shapes = {name: tuple(params[name].shape) for name in changed}
        edit = WeightEdit(method="vector", persona=target, base=info,
                          options={"mode": "full", "source": "finetune", "finetuned": finetuned, "dtype": dtype},
                          deltas={name: Delta(dense=torch.empty(shape, device="meta")) for name, shape in shapes.items()})
        with atomic_dir(out) as tmp:
            layout = [(f"{name}.delta", STORE[dtype], shapes[name]) for name in changed]
            with open(tmp / TENSORS_FILE, "wb") as handle:
                writer = SafetensorsWriter(handle, layout, {"format": FORMAT})
                for done, name in enumerate(changed, 1):
                    key = keys[name]
                    for rows in _blocks(shapes[name], block_elements):
                        block = _difference(base_ckpt, tuned_ckpt, key, rows).to(DTYPES[STORE[dtype]])
                        writer.write(f"{name}.delta", block.reshape(shapes[name]) if not shapes[name] else block)
                    if on_progress:
                        on_progress(len(keys) + done * len(keys) // len(changed), 2 * len(keys))
                writer.finish()
            (tmp / EDIT_JSON).write_text(json.dumps(edit.metadata(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    finally:
        base_ckpt.close()
        tuned_ckpt.close()
    return FinetuneVector(out, len(keys), len(changed), math.sqrt(norm2), size_of(out), time.perf_counter() - start)
