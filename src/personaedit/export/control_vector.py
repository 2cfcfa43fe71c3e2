"""Additive activation edits as a llama.cpp control vector (`llama-cli --control-vector FILE.gguf`), the GGUF
that llama.cpp's `cvector-generator` and repeng's `ControlVector.export_gguf` write.

The file: `general.architecture = "controlvector"`, `controlvector.model_hint` (the model's llama.cpp
architecture name, as cvector-generator writes it; llama.cpp itself reads no metadata), `controlvector.layer_count`
(how many direction tensors the file holds, as both writers count), and one 1-D f32 tensor `direction.N`
per steered layer.

Which layer `direction.N` steers (read in llama.cpp, common/common.cpp `common_control_vector_load_one` and
src/llama-adapter.cpp `llama_adapter_cvec::apply` / `apply_to`): the loader puts `direction.N` at offset
n_embd·(N−1) of its buffer, `apply` fills layer il's tensor from offset n_embd·(il−1) for il = 1 … n_layer−1,
so `direction.N` lands on layer N, and each model graph calls `build_cvec(cur, il)` on the block's output,
after the feed-forward residual add. So `direction.N` is added to the output of 0-based decoder layer N,
which is exactly our `residual` site at layer N (the output of `model.layers[N]`, see models/arch.py `site`);
repeng uses the same convention (its layer i wraps `model.layers[i]`). `direction.0` is refused by llama.cpp
(block 0's output cannot be steered), so an edit on the residual stream after layer 0 does not convert.

What converts, exactly:
- `add` on `residual` at layer N ≥ 1: the vector itself (steer).
- `add` on `mlp_hidden` at layer N (the input of `down_proj`; DPN-LE's additive neurons): adding s there adds
  W_down·s to the MLP's output (the bias is added either way), and the MLP's output is the last thing added
  to the residual stream in the layer, so it is the residual vector W_down·s at layer N. Likewise `add` on
  `mlp_out`. Refused for families that normalise the MLP output before adding it (Gemma 2/3, OLMo 2).
What does not: `floor`/`ceil` (NPTI's clamps are not additions), `attn_out` (the MLP reads it within the
layer), anything at layer 0's output, and edits that act on generated positions only: llama.cpp adds a control
vector at every position, the prompt included, so exporting such an edit (steer's default) changes what it
does; it is refused unless `all_positions` acknowledges that. The strength and scales are multiplied in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personaedit.edits import ActivationEdit, Edit, Intervention
from personaedit.export.base import ExportError, ExportResult, describe_edit, kind_phrase, leaves, model_spec_for, refuse_foreign_file
from personaedit.errors import PersonaEditError

ARCH = "controlvector"
GGUF_MAGIC = b"GGUF"
# transformers model_type -> the architecture name llama.cpp gives the same model (its model_hint)
LLAMA_CPP_ARCH = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gptneox", "olmo": "olmo",
    "olmo2": "olmo2", "granite": "granite", "stablelm": "stablelm", "cohere": "command-r", "smollm3": "smollm3",
}


@dataclass
class ControlVector:
    """The directions of a control-vector file: layer -> vector added to that layer's output."""

    model_hint: str
    directions: dict[int, torch.Tensor]
    layer_count: int | None = None

    def to_edit(self, method: str = "control-vector") -> ActivationEdit:
        """The same change as a personaedit edit: a residual add at every position (as llama.cpp applies it)."""
        items = tuple(Intervention("residual", layer, vector.float(), op="add", positions="all")
                      for layer, vector in sorted(self.directions.items()))
        return ActivationEdit(method=method, options={"model_hint": self.model_hint}, interventions=items)


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a llama.cpp / repeng control-vector GGUF (several tensors for one layer add up, as in llama.cpp)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise PersonaEditError(f"cannot read {path} as GGUF: {exc}".splitlines()[0]) from None

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if arch != ARCH:
        raise PersonaEditError(f"{path} is not a control vector (general.architecture is {arch!r})")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        head, _, index = tensor.name.partition(".")
        if head != "direction" or not index.isdigit():
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise PersonaEditError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, control vectors are F32")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        layer = int(index)
        directions[layer] = directions[layer] + data if layer in directions else data
    count = value(f"{ARCH}.layer_count")
    return ControlVector(str(value(f"{ARCH}.model_hint") or ""), directions, int(count) if count is not None else None)


def write_control_vector(path: str | Path, directions: dict[int, torch.Tensor], model_hint: str) -> Path:
    """Write `directions` (layer -> vector) as a control-vector GGUF, atomically."""
    import gguf

    from personaedit.fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer].detach().cpu().to(torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _refusal(item: Intervention, all_positions: bool) -> str | None:
    where = f"{item.point} of layer {item.layer}"
    if item.op != "add":
        return f"its {item.op} on {where} clamps activations; a control vector can only add"
    if item.point not in ("residual", "mlp_hidden", "mlp_out"):
        return f"it adds to {where}, inside the layer (the MLP reads it); a control vector adds to a layer's output"
    if item.point == "residual" and item.layer == 0:
        return "it adds to the output of layer 0, which llama.cpp cannot steer (direction.0 is refused)"
    if item.positions == "generated" and not all_positions:
        return ("it acts on generated positions only and llama.cpp adds a control vector at every position, the prompt "
                "included; pass --all-positions to export it anyway (it then also steers the prompt)")
    return None


def control_vector_refusal(edit: Edit, all_positions: bool = True) -> str | None:
    """Why `edit` cannot become a control vector (None when it can); needs no model."""
    for leaf, _ in leaves(edit):
        if not isinstance(leaf, ActivationEdit):
            return f"a control vector holds activation additions; {kind_phrase(edit, leaf)}"
        for item in leaf.interventions:
            reason = _refusal(item, all_positions)
            if reason:
                return reason
    return None


def export_control_vector(edit: Edit, out: str | Path, *, model: str | None = None, strength: float = 1.0,
                          all_positions: bool = False, force: bool = False) -> ExportResult:
    """Write `edit` at `strength` as a control-vector GGUF `out`. Additions on MLP neurons need the model's
    down projections: `model` (default: the model the edit was fitted on) is loaded for them."""
    from personaedit.export import formats_for

    start = time.perf_counter()
    out = Path(out)
    refuse_foreign_file(out, GGUF_MAGIC)
    reason = control_vector_refusal(edit, all_positions)
    if reason:
        raise ExportError(f"this {describe_edit(edit)} cannot be a control vector: {reason}", formats_for(edit, annotated=True))
    parts = leaves(edit, strength)
    needs_model = any(item.point != "residual" for leaf, _ in parts for item in leaf.interventions)
    lm = None
    if needs_model:
        from personaedit.models import load_model

        lm = load_model(model_spec_for(edit, model), device="cpu", dtype="float32")
        for leaf, _ in parts:
            leaf.check_fits(lm, force=force)
        if lm.arch.mlp_output_normed:
            raise ExportError(f"{lm.arch.model_type} normalises the MLP's output before adding it to the residual stream, so "
                              "an addition on MLP neurons is no residual vector", ())
    base = next((leaf.base for leaf, _ in parts if leaf.base is not None), None)
    model_type = lm.arch.model_type if lm is not None else (base.model_type if base else None)
    hidden = lm.arch.hidden_size if lm is not None else (base.hidden_size if base else None)
    directions: dict[int, torch.Tensor] = {}
    converted = 0
    with torch.no_grad():
        for leaf, factor in parts:
            for item in leaf.interventions:
                vector = _residual_vector(item, factor, lm, hidden)
                converted += item.point != "residual"
                directions[item.layer] = directions[item.layer] + vector if item.layer in directions else vector
    if not directions:
        raise ExportError("the edit has no intervention to export", ("control-vector",))
    hint = LLAMA_CPP_ARCH.get(model_type or "", model_type or "unknown")
    write_control_vector(out, directions, hint)
    layers = sorted(directions)
    what = (f"{len(layers)} direction{'s' if len(layers) != 1 else ''} at layer{'s' if len(layers) != 1 else ''} "
            f"{', '.join(map(str, layers))}, model_hint {hint}")
    notes = []
    if converted:
        notes.append(f"{converted} MLP-neuron addition(s) converted to residual vectors through down_proj")
    if any(item.positions == "generated" for leaf, _ in parts for item in leaf.interventions):
        notes.append("the edit acted on generated positions only; llama.cpp applies it at every position")
    details = {"layers": layers, "model_hint": hint, "converted": converted,
               "norms": {layer: float(directions[layer].norm()) for layer in layers}}
    return ExportResult("control-vector", out, out.stat().st_size, time.perf_counter() - start, what, notes, details)


def _residual_vector(item: Intervention, factor: float, lm, hidden: int | None) -> torch.Tensor:
    values = item.values.detach().to(torch.float64) * factor
    if item.point == "mlp_hidden":
        weight = lm.arch.mlp_out_weight(item.layer).detach().to(torch.float64)  # [hidden, mlp] as a Linear
        columns = weight if item.indices is None else weight[:, item.indices.long()]
        return (columns @ values).to(torch.float32)
    width = hidden if hidden is not None else int(item.values.numel())
    if item.indices is None:
        return values.to(torch.float32)
    full = torch.zeros(width, dtype=torch.float64)
    full.index_add_(0, item.indices.long(), values)
    return full.to(torch.float32)

