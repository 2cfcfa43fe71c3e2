"""`personaedit export` (an edit in the formats other engines serve) and `personaedit vector from-finetune`
(a fine-tuned model folder as a personality vector). Registered on the main app by `register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from personaedit.cli_shared import MODEL_HELP, err, stdout


def export(
    source: str = typer.Argument(..., metavar="EDIT_DIR",
                                 help="An edit folder; for --format gguf also a model (a merged folder, default, a .gguf)."),
    fmt: str = typer.Option(..., "--format", "-f", help="peft | control-vector | gguf | prompt"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder (peft) or file (control-vector, gguf, prompt) to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help=MODEL_HELP + " (default: the model the edit was made for)."),
    strength: float = typer.Option(1.0, "--strength", "-s", help="Strength the edit is exported at."),
    rank: int = typer.Option(16, "--rank", min=1, help="peft: rank dense deltas are cut to (by truncated SVD)."),
    skip_unsupported: bool = typer.Option(False, "--skip-unsupported",
                                          help="peft: leave out changes to embeddings, norms and biases (named) instead of refusing."),
    all_positions: bool = typer.Option(False, "--all-positions",
                                       help="control-vector: export an edit made for generated positions only; llama.cpp "
                                            "applies it at every position, the prompt included."),
    dtype: str = typer.Option("f16", "--dtype", help="gguf: f32 | f16 | q8_0."),
    force: bool = typer.Option(False, "--force", help="Apply the edit to a --model other than the one it was made for."),
) -> None:
    """Write an edit as a PEFT LoRA adapter, a llama.cpp control vector, a GGUF model, or a chat prompt (JSON)."""
    from personaedit.export import export_edit

    with err.status(f"exporting {source} as {fmt}"):
        result = export_edit(source, fmt, out, model=model, strength=strength, rank=rank, skip_unsupported=skip_unsupported,
                             all_positions=all_positions, dtype=dtype, force=force)
    stdout.print(result.line(), markup=False)


def from_finetune(
    base: str = typer.Option(..., "--base", "-b", help=MODEL_HELP),
    finetuned: str = typer.Option(..., "--finetuned", "-f", help="The fine-tuned model (same architecture as --base)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the personality vector."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16: how the deltas are stored."),
    persona: Optional[str] = typer.Option(None, "--persona", "-p", help="What the fine-tune teaches, e.g. extraversion=high."),
) -> None:
    """φ = θ_finetuned − θ_base, streamed tensor by tensor, saved as a personality vector (`merge --vector` reads it)."""
    from personaedit.vectors.finetune import vector_from_finetune

    with err.status(f"reading {finetuned} against {base}"):
        result = vector_from_finetune(base, finetuned, out, dtype=dtype, persona=persona)
    stdout.print(result.line(), markup=False)


def register(app: typer.Typer, vector_app: typer.Typer) -> None:
    app.command("export")(export)
    vector_app.command("from-finetune")(from_finetune)
