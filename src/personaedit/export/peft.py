"""Weight edits as a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`), which
`PeftModel.from_pretrained`, vLLM (`--enable-lora --lora-modules name=DIR`) and llama.cpp's
`convert_lora_to_gguf.py` read.

A LoRA layer adds `scaling · B @ A` to a Linear weight [out, in], with B [out, r], A [r, in] and scaling =
lora_alpha / r. Our deltas are ΔW = u @ vᵀ in the parameter's own layout, so for nn.Linear B = u, A = vᵀ;
GPT-2's Conv1D stores its weight as [in, out] (ΔW_param = u vᵀ means ΔW_linear = v uᵀ), so there B = v,
A = uᵀ and the config sets `fan_in_fan_out`. Every module gets the same rank r (factors of lower rank are
padded with zero columns, which changes nothing) and lora_alpha = r, so scaling is 1: one `r` for every
module, which every LoRA reader accepts (vLLM has no per-module rank). The strength and the edit's scales
are multiplied into B.

- Factors (ROME, PALETTE, MEMIT, MEND, a vector trained with LoRA) export exactly: several factor pairs on one
  parameter (a composed edit) are concatenated, so the rank is their sum.
- A dense ΔW (a vector from full fine-tuning, `vector from-finetune`) is cut to `rank` by truncated SVD; the
  relative Frobenius error ‖ΔW − B A‖ / ‖ΔW‖ over all such parameters is reported.
- A LoRA adapter changes Linear weights only: deltas on embeddings, norms or biases are refused, or left
  out and named with `skip_unsupported`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from personaedit.edits import Edit, WeightEdit
from personaedit.export.base import RECORD_FILE as MARKER
from personaedit.export.base import (
    ExportError, ExportResult, kind_phrase, leaves, model_spec_for, record, refuse_foreign, size_of, skeleton,
)
from personaedit.fileio import atomic_dir, give_usual_mode
from personaedit.models.arch import is_transposed_linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_RANK = 16


def _module_kind(model: torch.nn.Module, name: str) -> tuple[str, str]:
    """('linear' | 'conv1d' | 'other', module path) of parameter `name` of the skeleton model."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return "missing", path
    if attr != "weight":
        return "other", path
    if is_transposed_linear(module):
        return "conv1d", path
    if isinstance(module, torch.nn.Linear):
        return "linear", path
    return "other", path


def _factors(parts: list[tuple[Any, float]], transposed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) with B @ A = Σ factor · ΔW in Linear orientation, when every part is a factor pair; else None."""
    if any(delta.u is None for delta, _ in parts):
        return None
    bs, as_ = [], []
    for delta, factor in parts:
        u, v = delta.u.detach().float().cpu(), delta.v.detach().float().cpu()
        left, right = (v, u) if transposed else (u, v)  # ΔW_linear = left @ rightᵀ
        bs.append(left * factor)
        as_.append(right.T)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _truncated(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B, A, ‖ΔW − BA‖², ‖ΔW‖²) of the best rank-`rank` approximation (SVD in float64)."""
    work = dense.to(torch.float64)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = min(rank, s.numel())
    b = (u[:, :keep] * s[:keep]).float()
    a = vh[:keep].float()
    total = float((s ** 2).sum())
    kept = float((s[:keep] ** 2).sum())
    return b, a, max(total - kept, 0.0), total


def export_peft(edit: Edit, out: str | Path, *, model: str | None = None, strength: float = 1.0,
                rank: int = DEFAULT_RANK, skip_unsupported: bool = False) -> ExportResult:
    """Write `edit` at `strength` as a PEFT LoRA adapter folder `out` for the model `model` (default: the
    model the edit was fitted on; only its config is read)."""
    from personaedit.export import formats_for

    start = time.perf_counter()
    out = Path(out)
    refuse_foreign(out, MARKER)
    if rank < 1:
        raise ExportError("--rank must be at least 1", formats_for(edit, annotated=True))
    parts = leaves(edit, strength)
    others = [leaf for leaf, _ in parts if not isinstance(leaf, WeightEdit)]
    if others:
        raise ExportError(f"a LoRA adapter holds weight changes; {kind_phrase(edit, others[0])}", formats_for(edit, annotated=True))
    by_param: dict[str, list[tuple[Any, float]]] = {}
    for leaf, factor in parts:
        for name, delta in leaf.deltas.items():
            by_param.setdefault(name, []).append((delta, factor))
    if not by_param:
        raise ExportError("the edit changes no parameter", formats_for(edit, annotated=True))
    spec = model_spec_for(edit, model)
    skeleton_model, folder = skeleton(spec)
    params = dict(skeleton_model.named_parameters())

    unsupported: list[str] = []
    kinds: dict[str, tuple[str, str]] = {}
    for name, pieces in by_param.items():
        if name not in params:
            raise ExportError(f"the edit changes {name}, which {spec} does not have", formats_for(edit, annotated=True))
        for delta, _ in pieces:
            if tuple(delta.shape) != tuple(params[name].shape):
                raise ExportError(f"the edit's {name} has shape {tuple(delta.shape)}, {spec}'s has {tuple(params[name].shape)}",
                                  formats_for(edit, annotated=True))
        kind, path = _module_kind(skeleton_model, name)
        if kind in ("linear", "conv1d"):
            kinds[name] = (kind, path)
        else:
            unsupported.append(name)
    if unsupported and not skip_unsupported:
        shown = ", ".join(unsupported[:3]) + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
        raise ExportError(f"a LoRA adapter changes Linear weights only; this edit also changes {shown} (embeddings, norms "
                          "or biases): pass --skip-unsupported to export without them", formats_for(edit, annotated=True))
    if not kinds:
        raise ExportError("none of the edit's parameters is a Linear weight a LoRA adapter can change", formats_for(edit, annotated=True))

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    residual, total, approximated = 0.0, 0.0, []
    for name, (kind, path) in kinds.items():
        pieces = by_param[name]
        transposed = kind == "conv1d"
        exact = _factors(pieces, transposed)
        if exact is not None:
            pairs[path] = exact
            continue
        dense = sum(factor * delta.materialise(torch.device("cpu")) for delta, factor in pieces)
        dense = dense.T if transposed else dense
        b, a, err2, norm2 = _truncated(dense, rank)
        pairs[path] = (b, a)
        residual += err2
        total += norm2
        approximated.append(name)
    r = max(b.shape[1] for b, _ in pairs.values())
    tensors: dict[str, torch.Tensor] = {}
    for path, (b, a) in sorted(pairs.items()):
        pad = r - b.shape[1]
        if pad:
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    relative_error = math.sqrt(residual / total) if total > 0 else 0.0
    conv1d = any(kind == "conv1d" for kind, _ in kinds.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(folder),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": conv1d,
        "target_modules": sorted(pairs), "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
    }
    details = {"rank": r, "modules": len(pairs), "exact": not approximated, "approximated": approximated,
               "relative_error": relative_error, "skipped": unsupported, "model": spec}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        give_usual_mode(tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / MARKER).write_text(record("edit", edit, format="peft", strength=strength, **details), encoding="utf-8")
    what = f"LoRA rank {r} on {len(pairs)} module{'s' if len(pairs) != 1 else ''}, "
    what += "exact" if not approximated else f"{len(approximated)} dense delta(s) cut to rank {rank}, relative error {relative_error:.3g}"
    notes = [f"skipped {len(unsupported)} parameter(s) a LoRA cannot change: {', '.join(unsupported)}"] if unsupported else []
    return ExportResult("peft", out, size_of(out), time.perf_counter() - start, what, notes, details)

