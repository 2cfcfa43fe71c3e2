"""`personaedit vector info` (norms and cosines of personality vectors) and `personaedit vector train`, whose
flags are the fields of `vectors.options.TrainOptions`, as `edit METHOD`'s are its method's options.
(`vector from-finetune` is registered by cli_export.py.)"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from personaedit.cli_shared import MODEL_HELP, err, flag_parameter, load, progress, staged, status, stdout
from personaedit.errors import InputFileError, PersonaEditError
from personaedit.option_groups import group_options
from personaedit.preflight import check_device, check_output_path
from personaedit.vectors.options import TrainOptions

vector_app = typer.Typer(help="Personality vectors: weight-space deltas of a fine-tune (train, info).",
                         no_args_is_help=True, pretty_exceptions_enable=False)


@vector_app.command("info")
def vector_info(
    vectors: List[Path] = typer.Argument(..., help="One or more personality vector folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the summaries and the cosine matrix as JSON."),
) -> None:
    """Norm per layer of each vector and, for several, the cosine similarity between them."""
    from personaedit.merge import cosine_matrix, summarise

    summaries = [summarise(path) for path in vectors]
    cosine = cosine_matrix(vectors) if len(vectors) > 1 else None
    if as_json:
        rows = [{**s.__dict__, "path": str(s.path)} for s in summaries]
        stdout.print(json.dumps({"vectors": rows, "cosine": cosine}, indent=2), markup=False)
        return
    labels = [f"#{i + 1}" for i in range(len(summaries))]
    for label, s in zip(labels, summaries):
        persona = ",".join(f"{k}={v:+g}" for k, v in (s.persona or {}).items()) or "-"
        stdout.print(f"{label} {s.path}  persona {persona}  made for {s.made_for or '-'}  "
                     f"{s.parameters} parameters ({s.low_rank} low-rank)  norm {s.norm:.4g}", markup=False)
    table = Table("layer", *labels, title="norm per layer")
    for layer in dict.fromkeys(k for s in summaries for k in s.layer_norms):
        table.add_row(layer, *(f"{s.layer_norms[layer]:.4g}" if layer in s.layer_norms else "-" for s in summaries))
    stdout.print(table)
    if cosine is not None:
        matrix = Table("cosine", *labels)
        for label, row in zip(labels, cosine):
            matrix.add_row(label, *(f"{value:+.3f}" for value in row))
        stdout.print(matrix)


def vector_train(persona: str, out: Path, model: str, device: Optional[str], **options: Any) -> None:
    """Fine-tune on dialogue in one persona (LoRA or full) and save φ = θ_ft − θ_base as a weight edit.

    Under `accelerate launch` every process trains (DDP; FSDP / DeepSpeed from accelerate's config) on its own
    device; --batch-size is the global batch; rank 0 alone prints progress and writes the vector."""
    from contextlib import nullcontext

    from torch import device as torch_device

    from personaedit import distributed
    from personaedit.persona import Persona
    from personaedit.vectors import train_vector

    config = TrainOptions(**options)
    target = Persona.parse(persona)
    check_device(device)
    check_output_path(out, folder=True)
    if config.big5_chat is not None and not config.big5_chat.is_file():
        raise InputFileError(f"--big5-chat {config.big5_chat}: no such file")
    processes, main = distributed.world_size(), distributed.is_main()
    if config.batch_size % processes:
        raise PersonaEditError(f"--batch-size {config.batch_size} is the global batch: it must split evenly over the "
                               f"{processes} processes the launcher started")
    if distributed.single_cpu_process_of_many():
        err.print("note: `accelerate launch --cpu` started one process (it starts more only with --mpirun_hostfile); for "
                  "N CPU processes here: CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N ...",
                  markup=False)
    if processes == 1:
        lm = load(model, device)
    else:  # join the launcher's process group; rank 0 loads first when a GGUF file is converted into the cache
        from personaedit.models import load_model
        from personaedit.models.loading import NAMED_MODELS, pick_device

        distributed.start(cpu=pick_device(device).type == "cpu")
        converts = model in NAMED_MODELS or model.endswith(".gguf")
        with status(f"loading {model} in {processes} processes") if main else nullcontext():
            lm = distributed.in_turn(lambda: load_model(model, device=device)) if converts else load_model(model, device=device)
    with progress() if main else nullcontext() as bars:
        on_progress = staged(bars) if main else None

        trained = train_vector(lm, target, out, config, on_progress=on_progress)
    if not main:
        return
    if all(float(delta.materialise(torch_device("cpu")).abs().max()) == 0 for delta in trained.edit.deltas.values()):
        err.print("warning: the vector is all zeros: training changed nothing (too few steps, or a learning rate of 0); "
                  "it will not change the model", markup=False)
    resumed = f", resumed at step {trained.resumed_from}" if trained.resumed_from else ""
    loss = f", loss {trained.train_loss:.3f}" if trained.train_loss is not None else ""
    err.print(f"saved personality vector ({target.spec()}, {len(trained.edit.deltas)} parameters, {trained.examples} "
              f"examples, {trained.steps} steps{resumed}{loss}, {trained.seconds:.0f} s training) to {out}")


vector_train.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("persona", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                      default=typer.Option(..., "--persona", "-p", help="e.g. extraversion=high")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        ..., "--out", "-o", help="Folder for the vector; re-running resumes from its checkpoints.")),
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                      default=typer.Option("default", "--model", "-m", help=MODEL_HELP)),
    *(flag_parameter(name, opt.annotation, opt.default, opt.help, opt.flag, opt.min)
      for name, opt in group_options(TrainOptions()).items()),
    inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--device", help="cpu | cuda | mps (default: best available).")),
])
vector_app.command("train")(vector_train)
