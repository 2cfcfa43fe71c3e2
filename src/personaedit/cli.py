"""The `personaedit` command: parse, call the library, print with rich.

Errors a user can cause print one line on stderr and exit with status 2; `--verbose` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from personaedit.errors import InputFileError, PersonaEditError
from personaedit.preflight import check_device, check_dtype, check_output_path, parse_edit_option  # noqa: F401 (tests import parse_edit_option from here)

app = typer.Typer(
    name="personaedit",
    help="Edit, steer and measure the personality of open-weight language models, offline.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line stays one line
_state = {"verbose": False}

MODEL_HELP = "default | a local HF folder | a .gguf file | a hub id already in the local cache"


@app.callback()
def _main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks of errors.")) -> None:
    _state["verbose"] = verbose


def _progress() -> Any:
    """Bars on a terminal; in logs and pipes a plain line per task at least every 30 s (see cli_progress)."""
    if not err.is_terminal:
        from personaedit.cli_progress import LineProgress

        return LineProgress(sys.stderr)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
    )


def status(message: str) -> Any:
    """A spinner on a terminal; the message as a line in logs and pipes."""
    if not err.is_terminal:
        from personaedit.cli_progress import LineStatus

        return LineStatus(sys.stderr, message)
    return err.status(message)


def _staged(progress: Progress):
    """A callback `(stage, done, total)` that shows one bar per stage."""
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return on_progress


def _load(model: str, device: Optional[str] = None, dtype: Optional[str] = None, trust_remote_code: bool = False):
    from personaedit.models import load_model

    check_device(device)
    check_dtype(dtype)

    with status(f"loading {model} (the first use of a GGUF file converts it once, ~30 s)"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _check_generation_length(lm: Any, max_new_tokens: int) -> None:
    """Refuse a reply length past the model's context window (it would never finish, or fail deep inside)."""
    context = getattr(lm.model.config, "max_position_embeddings", None) or getattr(lm.model.config, "n_positions", None)
    if context and max_new_tokens >= context:
        raise PersonaEditError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")


def _load_edits(options: List[str]):
    from personaedit.edits import ComposedEdit, load_edit

    if not options:
        return None
    parsed = [parse_edit_option(o) for o in options]
    edits = [load_edit(folder) for folder, _ in parsed]
    return ComposedEdit.of(*edits, weights=[s for _, s in parsed])


def _read_prompts(prompts: List[str], prompts_file: Optional[Path]) -> list[str]:
    collected = list(prompts)
    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"cannot read prompts file {prompts_file}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
        collected += [line.strip() for line in text.splitlines() if line.strip()]
    if not collected:
        raise InputFileError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return collected


@app.command()
def generate(
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="A user message (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="A file with one prompt per line."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    edit: List[str] = typer.Option([], "--edit", "-e", help="An edit folder, optionally DIR:STRENGTH (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help='One line per prompt: {"prompt": ..., "text": ...}.'),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model of the same shapes."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: by device)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Generate replies to prompts, batched, optionally under edits."""
    import contextlib

    from personaedit.models import generate as run_generate

    if sample and temperature <= 0:
        raise PersonaEditError("--temperature must be above 0 with --sample (greedy decoding is the default)")
    check_device(device)
    check_dtype(dtype)
    prompts = _read_prompts(prompt, prompts_file)
    composed = _load_edits(edit)
    lm = _load(model, device, dtype, trust_remote_code)
    _check_generation_length(lm, max_new_tokens)
    applied = composed.apply(lm, force=force) if composed else contextlib.nullcontext()
    with applied, _progress() as progress:
        task = progress.add_task("generating", total=len(prompts))
        replies = run_generate(
            lm, prompts, system=system, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
            seed=seed, batch_size=batch_size, on_batch=lambda done, _: progress.update(task, completed=done),
        )
    for question, reply in zip(prompts, replies):
        if as_json:
            stdout.print(json.dumps({"prompt": question, "text": reply}, ensure_ascii=False), markup=False)
        else:
            stdout.print(f"[bold]» {_escape(question)}[/bold]\n{_escape(reply)}\n")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


edit_app = typer.Typer(help="Fit an edit with a method and save it: personaedit edit METHOD --persona SPEC --out DIR.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(edit_app, name="edit")


def _option_type(annotation: Any) -> Any:
    """`int | None` -> Optional[int], which typer understands on every Python version."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[args[0]]
    return annotation


def _edit_command(name: str):
    """A typer command for one method, its options taken from the method's fit signature."""
    import inspect

    from personaedit.methods import fit_edit, get_method

    chosen = get_method(name)
    method_options = chosen.options()

    def command(model: str, persona: str, out: Path, device: Optional[str], force: bool, **options: Any) -> None:
        from personaedit.edits import Edit
        from personaedit.persona import Persona

        target = Persona.parse(persona)
        check_device(device)
        check_output_path(out, folder=True)
        if out.exists() and any(out.iterdir()) and not (out / "edit.json").exists():
            raise InputFileError(f"refusing to overwrite {out}: it exists and is not an edit folder")
        if (out / "edit.json").exists() and not force:
            raise InputFileError(f"{out} already holds an edit; pass --force to replace it")
        lm = _load(model, device)
        if options.pop("calibrate", False):
            from personaedit.cli_calibrate import fit_calibrated

            edit: Edit = fit_calibrated(lm, name, target, options)
        else:
            with _progress() as progress:
                task = progress.add_task(f"{name}: fitting", total=None)  # off a terminal: a line every 30 s
                edit = fit_edit(name, lm, target, **options,
                                on_progress=lambda done, total: progress.update(task, completed=done, total=total))
        edit.save(out)
        err.print(f"saved {edit.kind} edit ({name}, persona {target.spec()}) to {out}")

    params = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("default", "--model", "-m", help=MODEL_HELP)),
        inspect.Parameter("persona", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option(..., "--persona", "-p", help="e.g. extraversion=high,agreeableness=-0.5")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(..., "--out", "-o", help="Folder to write the edit to.")),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--device", help="cpu | cuda | mps")),
        inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--force", help="Replace an edit already in --out.")),
    ]
    if chosen.family == "activation":
        params.append(inspect.Parameter("calibrate", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--calibrate", help="Choose layers and strength for this model on validation questions first "
                                       "(`personaedit calibrate`; cached); strength 1 then means the chosen one.")))
    helps = chosen.option_help()
    for option, param in method_options.items():
        flag = "--" + option.replace("_", "-")
        params.append(inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(param.annotation),
                                        default=typer.Option(... if param.default is inspect.Parameter.empty else param.default,
                                                             flag, help=helps.get(option))))
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = f"{chosen.pretty_name}: {chosen.summary}\n\nReference: {chosen.reference}."
    return command


def _register_edit_commands() -> None:
    """One `edit METHOD` command per registered method. Building them imports every method (and torch), so it
    happens only for a command line that uses `edit`: `personaedit --help` stays fast."""
    from personaedit.methods import all_methods

    if _state.get("edit_commands"):
        return
    for name in all_methods():
        edit_app.command(name=name)(_edit_command(name))
    _state["edit_commands"] = True


@app.command()
def info(
    edit_dir: Path = typer.Argument(..., help="An edit folder."),
    as_json: bool = typer.Option(False, "--json", help="Print edit.json as it is."),
) -> None:
    """Show what an edit contains: method, persona, base model, and where it acts."""
    from personaedit.edits import load_edit

    edit = load_edit(edit_dir)
    if as_json:
        stdout.print(json.dumps(edit.metadata(), indent=2, sort_keys=True), markup=False)
        return
    _print_edit(edit, indent="")


def _print_edit(edit: Any, indent: str) -> None:
    from personaedit.edits import ActivationEdit, ComposedEdit, ContextEdit, WeightEdit

    stdout.print(f"{indent}[bold]{edit.kind} edit[/bold] · method [cyan]{edit.method}[/cyan] · scale {edit.scale:g}")
    if edit.persona:
        stdout.print(f"{indent}  persona: {edit.persona.spec()}")
    calibration = edit.options.get("calibration") if edit.options else None
    if edit.options:
        shown = {k: v for k, v in edit.options.items() if k != "calibration"}
        stdout.print(f"{indent}  options: {_escape(json.dumps(shown, sort_keys=True))}")
    if calibration:
        effect = calibration["validation"]["effect"]
        stdout.print(f"{indent}  calibrated for this model: strength {calibration['strength']:g} (the edit's scale)"
                     f"{' with ' + json.dumps(calibration['options']) if calibration['options'] else ''}; on "
                     f"{calibration['questions']} validation questions effect {effect['mean']:+.3f} "
                     f"[{effect['low']:+.3f}, {effect['high']:+.3f}] ({effect['verdict']}), coherent "
                     f"{calibration['validation']['coherent_share']:.0%}, perplexity "
                     f"×{calibration['validation']['perplexity_ratio']:.2f}")
    if edit.base:
        b = edit.base
        stdout.print(f"{indent}  base model: {b.spec} ({b.model_type}, {b.layers} layers, fingerprint {b.fingerprint})")
    if isinstance(edit, ContextEdit):
        if edit.system:
            stdout.print(f"{indent}  system prompt: {_escape(edit.system)}")
        stdout.print(f"{indent}  demonstrations: {len(edit.demonstrations)}")
    elif isinstance(edit, ActivationEdit):
        table = Table("layer", "site", "op", "positions", "neurons touched", "share")
        for item in edit.interventions:
            width = None
            if edit.base:
                width = edit.base.mlp_size if item.point in ("mlp_hidden", "mlp_gate") else edit.base.hidden_size
            share = f"{item.touched / width:.2%}" if width else "?"
            table.add_row(str(item.layer), item.point, item.op, item.positions, str(item.touched), share)
        stdout.print(table)
    elif isinstance(edit, WeightEdit):
        table = Table("parameter", "shape", "stored as")
        for name, delta in edit.deltas.items():
            table.add_row(name, "×".join(map(str, delta.shape)), f"rank-{delta.rank} factors" if delta.rank else "dense")
        stdout.print(table)
    elif isinstance(edit, ComposedEdit):
        for part, weight in edit.parts:
            stdout.print(f"{indent}  part at weight {weight:g}:")
            _print_edit(part, indent + "    ")


judge_app = typer.Typer(help="Score texts on the Big Five and MBTI axes with the offline text judge.",
                        pretty_exceptions_enable=False)
app.add_typer(judge_app, name="judge")


vector_app = typer.Typer(help="Personality vectors: weight-space deltas of a fine-tune (train, info).",
                         no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(vector_app, name="vector")

from personaedit.cli_export import register as _register_export_commands  # noqa: E402 - `export`, `vector from-finetune`

_register_export_commands(app, vector_app)

from personaedit.cli_calibrate import register as _register_calibrate  # noqa: E402 - `calibrate`

_register_calibrate(app)


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


@vector_app.command("train")
def vector_train(
    persona: str = typer.Option(..., "--persona", "-p", help="e.g. extraversion=high"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the vector; re-running resumes from its checkpoints."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    big5_chat: Optional[Path] = typer.Option(None, "--big5-chat", help="Train on this Big5-Chat CSV instead of distilled answers."),
    limit: int = typer.Option(64, "--limit", min=0, help="Training questions (or Big5-Chat rows) to use; 0 = all."),
    samples_per_question: int = typer.Option(1, "--samples-per-question", min=1, help="Distilled answers per question."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Length of distilled answers."),
    prompt_strength: float = typer.Option(1.5, "--prompt-strength", help="Persona prompt strength for distillation."),
    lora_rank: int = typer.Option(8, "--lora-rank", min=0, help="LoRA rank; 0 = full fine-tuning (dense vector)."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    target_modules: str = typer.Option("all-linear", "--target-modules", help="peft target modules (LoRA)."),
    epochs: float = typer.Option(2.0, "--epochs", min=0.0),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Default 2e-3 (LoRA) or 2e-5 (full)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    grad_accumulation: int = typer.Option(1, "--grad-accumulation", min=1),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per example (question + answer)."),
    save_steps: int = typer.Option(10, "--save-steps", min=1, help="Checkpoint every N optimiser steps."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | mps (default: best available)."),
) -> None:
    """Fine-tune on dialogue in one persona (LoRA or full) and save φ = θ_ft − θ_base as a weight edit.

    Under `accelerate launch` every process trains (DDP; FSDP / DeepSpeed from accelerate's config) on its own
    device; --batch-size is the global batch; rank 0 alone prints progress and writes the vector."""
    from contextlib import nullcontext

    from torch import device as torch_device

    from personaedit import distributed
    from personaedit.persona import Persona
    from personaedit.vectors import train_vector

    target = Persona.parse(persona)
    check_device(device)
    check_output_path(out, folder=True)
    if big5_chat is not None and not big5_chat.is_file():
        raise InputFileError(f"--big5-chat {big5_chat}: no such file")
    processes, main = distributed.world_size(), distributed.is_main()
    if batch_size % processes:
        raise PersonaEditError(f"--batch-size {batch_size} is the global batch: it must split evenly over the {processes} "
                               "processes the launcher started")
    if distributed.single_cpu_process_of_many():
        err.print("note: `accelerate launch --cpu` started one process (it starts more only with --mpirun_hostfile); for "
                  "N CPU processes here: CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N ...",
                  markup=False)
    if processes == 1:
        lm = _load(model, device)
    else:  # join the launcher's process group; rank 0 loads first when a GGUF file is converted into the cache
        from personaedit.models import load_model
        from personaedit.models.loading import NAMED_MODELS, pick_device

        distributed.start(cpu=pick_device(device).type == "cpu")
        converts = model in NAMED_MODELS or model.endswith(".gguf")
        with status(f"loading {model} in {processes} processes") if main else nullcontext():
            lm = distributed.in_turn(lambda: load_model(model, device=device)) if converts else load_model(model, device=device)
    with _progress() if main else nullcontext() as progress:
        on_progress = _staged(progress) if main else None

        trained = train_vector(
            lm, target, out, big5_chat=big5_chat, limit=limit, samples_per_question=samples_per_question,
            max_new_tokens=max_new_tokens, prompt_strength=prompt_strength, lora_rank=lora_rank, lora_alpha=lora_alpha,
            target_modules=target_modules, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
            grad_accumulation=grad_accumulation, max_length=max_length, save_steps=save_steps, seed=seed,
            on_progress=on_progress,
        )
    if not main:
        return
    if all(float(delta.materialise(torch_device("cpu")).abs().max()) == 0 for delta in trained.edit.deltas.values()):
        err.print("warning: the vector is all zeros: training changed nothing (too few steps, or a learning rate of 0); "
                  "it will not change the model", markup=False)
    resumed = f", resumed at step {trained.resumed_from}" if trained.resumed_from else ""
    loss = f", loss {trained.train_loss:.3f}" if trained.train_loss is not None else ""
    err.print(f"saved personality vector ({target.spec()}, {len(trained.edit.deltas)} parameters, {trained.examples} "
              f"examples, {trained.steps} steps{resumed}{loss}, {trained.seconds:.0f} s training) to {out}")


@app.command("merge")
def merge_command(
    base: Optional[str] = typer.Option(None, "--base", "-b", help=MODEL_HELP + " (default: default)."),
    vector: List[str] = typer.Option([], "--vector", help="A personality vector folder, DIR=ALPHA (repeatable; ALPHA may be negative)."),
    method: Optional[str] = typer.Option(None, "--method", help="task_arithmetic (default) | ties | dare_linear | dare_ties"),
    density: Optional[float] = typer.Option(None, "--density", help="ties: share of entries kept per vector, in (0, 1] (default 1)."),
    drop: Optional[float] = typer.Option(None, "--drop", help="dare_*: drop probability, in [0, 1) (default 0.5)."),
    normalize: Optional[str] = typer.Option(
        None, "--normalize",
        help="ties, dare_ties: count (default: mean over the vectors that agree) | weight-sum (over their weight sum, "
             "as mergekit; flips negation) | none (sum)."),
    no_normalize: bool = typer.Option(False, "--no-normalize", help="Same as --normalize none."),
    seed: Optional[int] = typer.Option(None, "--seed", help="dare_*: seed of the drops (default 0)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="e.g. 2GB (default), 500MB."),
    config: Optional[Path] = typer.Option(None, "--config", help="A YAML merge config; options given here override it."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the merged model (a Hugging Face folder)."),
) -> None:
    """Merge personality vectors into a base model, streaming tensors shard by shard."""
    from personaedit.merge import config_from_options, load_config, merge, parse_vector_option

    if no_normalize and normalize not in (None, "none"):
        raise PersonaEditError(f"--no-normalize contradicts --normalize {normalize}")
    options = dict(base=base, method=method, density=density, drop=drop, normalize="none" if no_normalize else normalize, seed=seed,
                   max_shard_size=max_shard_size, vectors=[parse_vector_option(v) for v in vector] or None)
    if config is None and not vector:
        raise PersonaEditError("give at least one --vector DIR=ALPHA, or --config merge.yaml")
    merge_config = load_config(config, **options) if config else config_from_options(**options)
    if out is not None or getattr(merge_config, "out", None) is not None:
        check_output_path(out if out is not None else merge_config.out, folder=True)
    with _progress() as progress:
        task = progress.add_task(f"merge: {merge_config.method}", total=None)
        result = merge(merge_config, out, on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    stdout.print(f"{result.method}: {len(merge_config.vectors)} vector(s) changed {result.tensors_merged} of "
                 f"{result.tensors_total} tensors; wrote {result.out} ({result.shards} shard(s), "
                 f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f} s", markup=False)


def _read_jsonl_texts(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise InputFileError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputFileError(f'{path}:{number}: each line needs a "text" string')
        rows.append(row)
    return rows


@judge_app.callback(invoke_without_command=True)
def judge(
    ctx: typer.Context,
    input_path: Optional[Path] = typer.Option(None, "--in", help='JSON lines, each with a "text" field.'),
    out: Optional[Path] = typer.Option(None, "--out", help='Output JSON lines: the input plus "scores".'),
    head: Optional[Path] = typer.Option(None, "--head", help="A judge head trained with `judge train`."),
) -> None:
    """Score texts: each output line adds "scores": {trait: value in [-1, 1]} (positive = high pole / E, S, T, J;
    near 0 when the text does not express the trait), and "unscorable": true (all scores 0) for degenerate text:
    empty, under four words, repetition loops, gibberish."""
    if ctx.invoked_subcommand:
        return
    from personaedit.eval.text_judge import TextJudge
    from personaedit.fileio import write_text_atomic

    if input_path is None or out is None:
        raise InputFileError("give --in TEXTS.jsonl --out SCORES.jsonl")
    check_output_path(out)
    rows = _read_jsonl_texts(input_path)
    scorer = TextJudge.load(head)
    with _progress() as progress:
        task = progress.add_task("judging", total=len(rows))
        found = scorer.assess([r["text"] for r in rows], on_progress=lambda done, _: progress.update(task, completed=done))
    lines = [json.dumps({**row, "scores": a.scores, **({"unscorable": True, "unscorable_reasons": list(a.reasons)}
                                                       if a.unscorable else {})}, ensure_ascii=False)
             for row, a in zip(rows, found)]
    write_text_atomic(out, "\n".join(lines) + ("\n" if lines else ""))
    err.print(f"scored {len(rows)} texts -> {out}")


@judge_app.command("train")
def judge_train(
    out: Path = typer.Option(..., "--out", help="Where to write the head (.safetensors; a .json beside it)."),
    seed: int = typer.Option(0, "--seed"),
    adapter: bool = typer.Option(False, "--adapter/--no-adapter",
                                 help="First train a LoRA adapter on the encoder (early-stopped on validation; minutes)."),
    encoder: Optional[str] = typer.Option(None, "--encoder",
                                          help="mpnet (default) | minilm (the encoder before issue 3; --adapter needs it)."),
    form: str = typer.Option("softmax3", "--form",
                             help="softmax3 (default: high / low / not expressed) | gated | pole (the head before issue 13)."),
) -> None:
    """Train the judge's heads on the training split (regularisation chosen on validation) and report accuracy."""
    from personaedit.models.encoders import AdapterConfig
    from personaedit.eval.judge_fit import train_text_judge
    from personaedit.eval.text_judge import HEAD_FORMS, JUDGE_ENCODER
    from personaedit.models.encoders import encoder_key

    key = encoder_key(encoder or ("minilm" if adapter else JUDGE_ENCODER))
    if adapter and key != "minilm":
        raise InputFileError("--adapter trains a LoRA adapter on all-MiniLM-L6-v2: use it with --encoder minilm")
    if form not in HEAD_FORMS:
        raise InputFileError(f"unknown --form {form!r}: expected one of {', '.join(HEAD_FORMS)}")
    check_output_path(out)
    with _progress() as progress:
        task = progress.add_task("training the judge", total=None)
        result = train_text_judge(out, seed=seed, adapter=AdapterConfig() if adapter else None, encoder_name=key, form=form,
                                  on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    stdout.print(json.dumps(result, indent=2, sort_keys=True, default=str), markup=False)


@judge_app.command("evaluate")
def judge_evaluate(
    head: Optional[Path] = typer.Option(None, "--head", help="A trained head (default: the shipped one)."),
    split: str = typer.Option("test", "--split", help="train | validation | test"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a reliability diagram (PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print every measure as JSON instead of tables."),
) -> None:
    """Pole accuracy, off-target |score|, trait intercorrelation and calibration on a split and on the check set."""
    from personaedit.eval.judge_training import DIMENSIONS, reliability_plot, specificity_report
    from personaedit.eval.text_judge import TextJudge

    if split not in ("train", "validation", "test"):
        raise InputFileError(f"unknown split {split!r}: expected train, validation or test")
    if plot is not None:
        check_output_path(plot, what="--plot")
    scorer = TextJudge.load(head)
    with status("encoding texts"):
        report = specificity_report(scorer, split)
    if plot is not None:
        reliability_plot({f"{split} split": report[split], "check set": report["check"]}, plot)
    if as_json:
        stdout.print(json.dumps(report, indent=1), markup=False)
        return
    names = {split: f"{split} split", "check": "check set"}
    table = Table("dimension", *(f"{names[k]}\n{m}" for k in names for m in ("pole accuracy", "on |score|", "off |score|")),
                  caption="on |score|: mean |score| on texts of the dimension; off |score|: on texts of the other "
                          "dimensions of its family (the smaller, the more specific)")
    for key in (*DIMENSIONS, "big_five", "mbti"):
        cells = []
        for k in names:
            acc, on = report[k]["pole_accuracy"].get(key), report[k]["on_target_mean_abs"].get(key)
            off = report[k]["off_target_mean_abs"].get(key)
            cells += ["-" if acc is None else f"{acc:.1%}", "-" if on is None else f"{on:.3f}",
                      "-" if off is None else f"{off:.3f}"]
        table.add_row("Big Five (pooled)" if key == "big_five" else "MBTI (pooled)" if key == "mbti" else key, *cells)
    stdout.print(table)
    for k, name in names.items():
        r = report[k]
        corr = ", ".join(f"{fam} {v['max_abs_off_diagonal']:.3f}" for fam, v in r["intercorrelation"].items())
        cal = r["calibration"]
        neutral = f"; neutral text mean |score| {r['neutral_mean_abs']['all']:.3f}" if "neutral_mean_abs" in r else ""
        stdout.print(f"{name}: max |r| between dimensions: {corr}; ECE three-way "
                     f"{cal['three_way_top_label']['ece']:.3f}, pole given expressed {cal['pole_given_expressed']['ece']:.3f}; "
                     f"which trait (5-way) {r['trait_id']:.1%}{neutral}", markup=False)
    if plot is not None:
        err.print(f"reliability diagram -> {plot}")


mend_app = typer.Typer(help="Train the MEND editor of a model (used by `personaedit edit mend`).",
                       no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(mend_app, name="mend")


@mend_app.command("train")
def mend_train(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Editor folder (default: the cache folder for this model)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A PersonalityEdit training file instead of the project's opinions."),
    steps: int = typer.Option(300, "--steps", min=1),
    layers: int = typer.Option(3, "--layers", min=1, help="How many of the last MLP layers the editor edits."),
    rank: int = typer.Option(64, "--rank", min=1, help="Hidden width of each layer's editor."),
    lr: float = typer.Option(1e-4, "--lr"),
    locality: float = typer.Option(1.0, "--locality", help="Weight of the locality KL."),
    seed: int = typer.Option(0, "--seed"),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore a checkpoint in the folder instead of resuming."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Train (or resume) the MEND editor on the training split; checkpoints every 50 steps."""
    from personaedit.methods.mend_editor import TrainConfig
    from personaedit.methods.mend_training import train_editor

    check_device(device)
    if out is not None:
        check_output_path(out, folder=True)
    if data is not None and not data.is_file():
        raise InputFileError(f"--data {data}: no such file")
    config = TrainConfig(layers=layers, rank=rank, steps=steps, lr=lr, locality=locality, seed=seed)
    lm = _load(model, device)
    with _progress() as progress:
        task = progress.add_task("mend: training the editor", total=steps)
        _, summary = train_editor(lm, out, config, data=data, resume=not fresh,
                                  on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    stdout.print(json.dumps(summary, indent=2, sort_keys=True), markup=False)


@app.command("eval")
def evaluate(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    edit: List[str] = typer.Option([], "--edit", "-e", help="An edit folder, optionally DIR:STRENGTH (repeatable)."),
    suite: str = typer.Option("quick", "--suite", help="quick | full"),
    out: Path = typer.Option(..., "--out", help="Report JSON (schema in docs/EVAL.md)."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML page with plots."),
    force: bool = typer.Option(False, "--force", help="Apply edits made for another model of the same shapes."),
    device: Optional[str] = typer.Option(None, "--device"),
    llm_judge: Optional[str] = typer.Option(None, "--llm-judge", help="An OpenAI-compatible endpoint (base URL, e.g. "
                                            "http://127.0.0.1:8000/v1) for PAE; optional, never required."),
    llm_judge_model: Optional[str] = typer.Option(None, "--llm-judge-model",
                                                  help="The judge's model name (default: $PERSONAEDIT_JUDGE_MODEL)."),
) -> None:
    """Measure a model, and under edits the effect of each: every trait's effect on held-out questions with its
    interval and verdict, the log-prob margin, coherence, capability retention, controllability, robustness, and
    for topic edits ES/DD/Acc/TPEI (PAE with --llm-judge)."""
    from personaedit.eval.report import write_html
    from personaedit.eval.suite import SUITES, run_suite
    from personaedit.fileio import write_json_atomic

    if suite not in SUITES:
        raise InputFileError(f"unknown suite {suite!r} (valid: {', '.join(SUITES)})")
    check_device(device)
    check_output_path(out)
    if html_path is not None:
        check_output_path(html_path, what="--html")
    judge_client = None
    if llm_judge is not None:
        from personaedit.eval.llm_client import plain_http_off_machine
        from personaedit.eval.llm_judge import LLMJudge

        judge_client = LLMJudge(base_url=llm_judge, model=llm_judge_model)
        if plain_http_off_machine(llm_judge):
            err.print(f"warning: {llm_judge} is plain http to another machine: replies and any API key travel "
                      "unencrypted", markup=False)
    composed = _load_edits(edit)
    lm = _load(model, device)
    with _progress() as progress:
        on_progress = _staged(progress)

        report = run_suite(lm, composed, suite=suite, force=force, llm_judge=judge_client, on_progress=on_progress)
    write_json_atomic(out, report)
    if html_path is not None:
        write_html(report, html_path)
    _print_eval_summary(report)
    err.print(f"report -> {out}" + (f", {html_path}" if html_path else ""))


def _print_eval_summary(report: dict[str, Any]) -> None:
    conditions = report["conditions"]
    table = Table("measure", *conditions, title=f"personaedit eval · {report['model']['spec']} · {report['suite']}")
    dims = list(next(iter(conditions.values()))["expression"]["mean_scores"])
    for dim in dims:
        table.add_row(f"judge: {dim}", *(f"{c['expression']['mean_scores'][dim]:+.3f}" for c in conditions.values()))
    for trait in next(iter(conditions.values()))["inventory"]["traits"]:
        table.add_row(f"inventory: {trait}", *(f"{c['inventory']['traits'][trait]['signed']:+.3f}" for c in conditions.values()))
    table.add_row("coherent replies", *(f"{c['coherence']['coherent_share']:.0%}" for c in conditions.values()))
    table.add_row("perplexity (neutral text)", *(f"{c['perplexity']:.2f}" for c in conditions.values()))
    if "kl_to_base" in report:
        table.add_row("KL to base (neutral prompts)", "", f"{report['kl_to_base']:.4f}")
    stdout.print(table)
    if "effects" in report:
        from personaedit.eval.report import effect_rows, summary_lines

        effects = Table("effect (edited − base, paired)", "mean [95% interval]", "n", "verdict",
                        title="the edit's effects on held-out data (+ = towards the persona)")
        for row in effect_rows(report["effects"]):
            effects.add_row(*row)
        stdout.print(effects)
        for line in summary_lines(report):
            stdout.print(line, markup=False)


@app.command()
def bench(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    methods: str = typer.Option("all", "--methods", help="all | comma-separated method names."),
    personas: List[str] = typer.Option(["all-poles"], "--personas",
                                       help="A persona spec (repeatable; ';' separates several), or all-poles / all-high."),
    strengths: str = typer.Option("1", "--strengths", help="Comma-separated strengths, e.g. 0,0.5,1,1.5,2."),
    out: Path = typer.Option(..., "--out", help="Bench folder: results.sqlite, edits/, report.{md,html}, plots/."),
    suite: str = typer.Option("quick", "--suite", help="quick | full"),
    backend: str = typer.Option("local", "--backend", help="local | ray (an existing Ray cluster, or a local one)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="--backend ray: the cluster's head, HOST:PORT (default: RAY_ADDRESS, "
                                                   "else a local cluster started here)."),
    settings: List[str] = typer.Option([], "--set", help="A method option, METHOD.OPTION=VALUE (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Fit, evaluate and compare methods over personas and strengths; resumable; writes a report with plots.

    With --backend ray each (method, persona) runs as a Ray task; a task that fails is recorded in
    results.sqlite (table failures) and run again, up to 3 times."""
    from rich.markdown import Markdown

    from personaedit.bench import (check_resumable, parse_method_options, parse_personas, parse_strengths, run_bench,
                                   select_methods)
    from personaedit.bench.report import write_report

    chosen = select_methods(methods)
    specs = parse_personas([part for option in personas for part in option.split(";")])
    levels = parse_strengths(strengths)
    options = parse_method_options(settings, chosen)
    from personaedit.bench.runner import BACKENDS

    if backend not in BACKENDS:
        raise PersonaEditError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    if ray_address is not None and backend != "ray":
        raise PersonaEditError("--ray-address is for --backend ray")
    check_device(device)
    check_output_path(out, folder=True)
    check_resumable(out, chosen, suite=suite, method_options=options)  # a folder that cannot resume: before the load
    if backend == "ray":
        from personaedit.bench.ray_backend import connect

        with status(f"connecting to the Ray cluster at {ray_address}" if ray_address else "starting Ray"):
            connect(ray_address)  # an address with no cluster behind it: one line, before the model is loaded
    lm = _load(model, device)
    lost = None
    with _progress() as progress:
        task = progress.add_task("bench", total=None)

        def on_progress(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=f"bench: {label}")

        try:
            run_bench(lm, chosen, specs, levels, out, suite=suite, backend=backend, ray_address=ray_address,
                      method_options=options, on_progress=on_progress)
        except PersonaEditError as exc:
            from personaedit.bench.ray_backend import CellsFailed

            if not isinstance(exc, CellsFailed):
                raise
            lost = exc
    written = write_report(out)
    stdout.print(Markdown(written["markdown"].read_text(encoding="utf-8").split("\n\n")[0]))
    err.print(f"report -> {written['html']}, {written['markdown']}")
    if backend == "ray":
        from personaedit.bench.failures import FailureLog

        with FailureLog(out / "results.sqlite") as log:
            failures = log.rows()
        if failures and lost is None:
            err.print(f"{len({f['key'] for f in failures})} cell(s) failed on a Ray worker and finished when run again "
                      "(each attempt is in results.sqlite, table failures)", markup=False)
    if lost is not None:
        err.print(f"error: {lost}", markup=False)
        raise typer.Exit(1)


@app.command()
def models() -> None:
    """List the models this machine can load without a download."""
    from personaedit.models.listing import available_models

    table = Table("model", "type", "where", "note")
    for entry in available_models():
        table.add_row(entry.spec, entry.model_type, entry.location, entry.note)
    stdout.print(table)


@app.command()
def demo(
    persona: str = typer.Option("extraversion=high", "--persona", help="Persona spec, e.g. agreeableness=low."),
    questions: int = typer.Option(3, "--questions", min=1, max=12, help="How many held-out questions."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: prompt, steer, dpnle, palette)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    html_path: Path = typer.Option(Path("personaedit-demo.html"), "--html", help="Where to write the HTML page."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
) -> None:
    """The main job: one persona applied by each method family, replies and judge scores side by side."""
    from personaedit.bench import select_methods
    from personaedit.demo import DEMO_METHODS, demo_questions, run_demo, write_demo_html
    from personaedit.persona import Persona

    target = Persona.parse(persona)
    chosen = DEMO_METHODS if methods is None else {m: DEMO_METHODS.get(m, {}) for m in select_methods(methods)}
    check_output_path(html_path, what="--html")
    lm = _load(model)
    asked = demo_questions(target, questions)
    with status("demo") as demo_status:
        result = run_demo(lm, target, asked, methods=chosen, max_new_tokens=max_new_tokens,
                          on_step=lambda title: demo_status.update(f"demo: {title} (the first run fits and caches, a few minutes)"))
    table = Table(title=f"personaedit demo · {lm.spec} · persona {target.spec()}", show_lines=True, expand=True)
    table.add_column("question", ratio=2, style="bold")
    for title in result.columns:
        fit = f"\nfit {result.fit_seconds[title]:.0f} s" if title in result.fit_seconds else ""
        effect = result.effect(title)
        moved = f"\neffect {effect.describe('+.2f')}\n{effect.verdict}" if effect else ""
        table.add_column(f"{title}\njudge {result.mean_score(title):+.2f}{moved}{fit}", ratio=3)
    for row, question in enumerate(result.questions):
        table.add_row(_escape(question), *(f"{_escape(replies[row])} [dim]({result.scores[t][row]:+.2f})[/dim]"
                                           for t, replies in result.columns.items()))
    stdout.print(table)
    stdout.print("judge: the offline text judge's score of each reply towards the persona (-1 … +1); effect: per question, "
                 f"the column's score − the plain model's, with its 95% interval over {len(result.questions)} question(s) "
                 "(Student's t: few questions, a wide interval; `personaedit eval` measures on 100 held-out questions)")
    write_demo_html(result, lm.spec, html_path)
    err.print(f"html -> {html_path}")


from personaedit.cli_serve import serve  # noqa: E402 - its own module: FastAPI and uvicorn are an optional extra

app.command()(serve)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app; user errors and usage errors print one line and exit with status 2."""
    click = _click_exceptions()
    args = sys.argv[1:] if argv is None else argv
    if "edit" in args:
        _register_edit_commands()
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="personaedit", standalone_mode=False)
    except PersonaEditError as exc:
        _fail(exc, str(exc))
    except getattr(click, "NoArgsIsHelpError", ()) as exc:  # a group called bare: its help, as click would
        exc.show(file=sys.stdout)
    except click.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _fail(exc, f"{exc.format_message()}{where}")
    except click.ClickException as exc:  # e.g. a file option click could not open
        _fail(exc, exc.format_message())
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # `personaedit ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        sys.exit(0)


def _fail(exc: BaseException, message: str) -> None:
    if _state["verbose"]:
        traceback.print_exception(exc)
    lines = [line for line in message.splitlines() if line.strip()] or [type(exc).__name__]
    sys.stderr.write(f"error: {lines[0]}\n")
    sys.exit(2)


def _click_exceptions():
    """The exception classes of the click that typer runs on (recent typer vendors its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions
