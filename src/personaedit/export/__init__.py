"""Ship an edit: write what personaedit fits in the formats the engines that serve at scale read.

- `peft`: weight edits -> a PEFT LoRA adapter folder (HF PEFT, vLLM `--enable-lora`, llama.cpp after
  `convert_lora_to_gguf.py`).
- `control-vector`: additive activation edits -> a llama.cpp control vector (`--control-vector FILE.gguf`).
- `gguf`: a merged model folder, or a weight edit applied to a model -> a GGUF model file (`-m FILE.gguf`).
- `prompt`: context edits -> their system prompt and demonstrations as JSON for any chat API.

`formats_for(edit)` says which formats an edit can go into; `export_edit` writes one and refuses a format the
edit cannot take with the reason and the formats it can. docs/EXPORT.md lists what converts exactly.
"""

from __future__ import annotations

from pathlib import Path

from personaedit.edits import ActivationEdit, ContextEdit, Edit, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.export.base import FORMATS, ExportError, ExportResult, leaves
from personaedit.export.control_vector import (
    ControlVector, control_vector_refusal, export_control_vector, read_control_vector, write_control_vector,
)
from personaedit.export.gguf_model import export_gguf_model
from personaedit.export.peft import export_peft
from personaedit.export.prompt import export_prompt, prompt_payload, prompt_refusal


def formats_for(edit: Edit, annotated: bool = False) -> list[str]:
    """The formats `edit` can be exported to (a control vector counts when it converts with --all-positions,
    said so when `annotated`; which parameters a LoRA can hold is known only with the model's module types)."""
    kinds = {type(leaf) for leaf, _ in leaves(edit)}
    formats = []
    if kinds and kinds <= {WeightEdit}:
        formats += ["peft", "gguf"]
    if kinds and kinds <= {ActivationEdit} and control_vector_refusal(edit, all_positions=True) is None:
        needs_flag = annotated and control_vector_refusal(edit, all_positions=False) is not None
        formats.append("control-vector (with --all-positions)" if needs_flag else "control-vector")
    if kinds and kinds <= {ContextEdit} and prompt_refusal(edit) is None:
        formats.append("prompt")
    return formats


def export_edit(edit: Edit | str | Path, fmt: str, out: str | Path, *, model: str | None = None, strength: float = 1.0,
                rank: int = 16, skip_unsupported: bool = False, all_positions: bool = False, dtype: str = "f16",
                force: bool = False) -> ExportResult:
    """Export `edit` (an Edit or an edit folder) in format `fmt` to `out`. For `gguf`, `edit` may also be a model
    spec (a merged HF folder, `default`, a `.gguf` file), written as it is."""
    if fmt not in FORMATS:
        raise PersonaEditError(f"unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    try:
        return _export(edit, fmt, Path(out), model=model, strength=strength, rank=rank, skip_unsupported=skip_unsupported,
                       all_positions=all_positions, dtype=dtype, force=force)
    except OSError as exc:  # an output folder that cannot be made, a full disk
        raise PersonaEditError(f"cannot export to {out}: {exc.strerror or exc}"
                               + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else "")) from exc


def _export(edit, fmt: str, out: Path, *, model, strength, rank, skip_unsupported, all_positions, dtype, force) -> ExportResult:
    from personaedit.edits import load_edit
    from personaedit.edits.base import EDIT_JSON

    if not isinstance(edit, Edit):
        source = str(edit)
        if fmt == "gguf" and not (Path(source) / EDIT_JSON).is_file():
            return export_gguf_model(source, out, model=model, dtype=dtype)
        edit = load_edit(source)
    if fmt == "peft":
        return export_peft(edit, out, model=model, strength=strength, rank=rank, skip_unsupported=skip_unsupported)
    if fmt == "control-vector":
        return export_control_vector(edit, out, model=model, strength=strength, all_positions=all_positions, force=force)
    if fmt == "gguf":
        return export_gguf_model("", out, edit=edit, model=model, strength=strength, dtype=dtype, force=force)
    return export_prompt(edit, out, strength=strength)


__all__ = [
    "FORMATS", "ControlVector", "ExportError", "ExportResult", "export_control_vector", "export_edit",
    "export_gguf_model", "export_peft", "export_prompt", "formats_for", "prompt_payload", "read_control_vector",
    "write_control_vector",
]
