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
from rich.table import Table

from personaedit.cli_edit import edit_app, info, mend_app, register_edit_commands
from personaedit.cli_eval import demo, evaluate
from personaedit.cli_judge import judge_app
from personaedit.cli_serve import serve
from personaedit.cli_shared import MODEL_HELP, err, escape, load, load_edits, progress, status, stdout
from personaedit.cli_vector import vector_app
from personaedit.errors import InputFileError, PersonaEditError
from personaedit.preflight import check_device, check_dtype, check_output_path

app = typer.Typer(
    name="personaedit",
    help="Edit, steer and measure the personality of open-weight language models, offline.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_state = {"verbose": False}


@app.callback()
def _main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks of errors.")) -> None:
    _state["verbose"] = verbose


def _check_generation_length(lm: Any, max_new_tokens: int) -> None:
    """Refuse a reply length past the model's context window (it would never finish, or fail deep inside)."""
    context = getattr(lm.model.config, "max_position_embeddings", None) or getattr(lm.model.config, "n_positions", None)
    if context and max_new_tokens >= context:
        raise PersonaEditError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")


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
    composed = load_edits(edit)
    lm = load(model, device, dtype, trust_remote_code)
    _check_generation_length(lm, max_new_tokens)
    applied = composed.apply(lm, force=force) if composed else contextlib.nullcontext()
    with applied, progress() as bars:
        task = bars.add_task("generating", total=len(prompts))
        replies = run_generate(
            lm, prompts, system=system, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
            seed=seed, batch_size=batch_size, on_batch=lambda done, _: bars.update(task, completed=done),
        )
    for question, reply in zip(prompts, replies):
        if as_json:
            stdout.print(json.dumps({"prompt": question, "text": reply}, ensure_ascii=False), markup=False)
        else:
            stdout.print(f"[bold]» {escape(question)}[/bold]\n{escape(reply)}\n")


app.add_typer(edit_app, name="edit")
app.command()(info)


app.add_typer(judge_app, name="judge")


app.add_typer(vector_app, name="vector")

from personaedit.cli_export import register as _register_export_commands  # noqa: E402 - `export`, `vector from-finetune`

_register_export_commands(app, vector_app)

from personaedit.cli_calibrate import register as _register_calibrate  # noqa: E402 - `calibrate`

_register_calibrate(app)


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
    with progress() as bars:
        task = bars.add_task(f"merge: {merge_config.method}", total=None)
        result = merge(merge_config, out, on_progress=lambda done, total: bars.update(task, completed=done, total=total))
    stdout.print(f"{result.method}: {len(merge_config.vectors)} vector(s) changed {result.tensors_merged} of "
                 f"{result.tensors_total} tensors; wrote {result.out} ({result.shards} shard(s), "
                 f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f} s", markup=False)


app.add_typer(mend_app, name="mend")
app.command("eval")(evaluate)


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
    from personaedit.bench.ray_backend import CellsFailed, connect  # Ray itself is imported only to connect

    if backend == "ray":
        with status(f"connecting to the Ray cluster at {ray_address}" if ray_address else "starting Ray"):
            connect(ray_address)  # an address with no cluster behind it: one line, before the model is loaded
    lm = load(model, device)
    lost = None
    with progress() as bars:
        task = bars.add_task("bench", total=None)

        def on_progress(done: int, total: int, label: str) -> None:
            bars.update(task, completed=done, total=total, description=f"bench: {label}")

        try:
            run_bench(lm, chosen, specs, levels, out, suite=suite, backend=backend, ray_address=ray_address,
                      method_options=options, on_progress=on_progress)
        except CellsFailed as exc:  # the other cells are stored: report them, then say which never finished
            lost = exc
    written = write_report(out)
    stdout.print(Markdown(written["markdown"].read_text(encoding="utf-8").split("\n\n")[0]))
    err.print(f"report -> {written['html']}, {written['markdown']}")
    if backend == "ray" and lost is None:
        from personaedit.bench import ResultStore
        from personaedit.bench.failures import FailureLog

        with FailureLog(out / "results.sqlite") as log, ResultStore(out / "results.sqlite") as store:
            retried = {f["key"] for f in log.rows()} & store.done()
        if retried:
            err.print(f"{len(retried)} stored cell(s) failed on a Ray worker before they finished (each attempt is in "
                      "results.sqlite, table failures)", markup=False)
    if lost is not None:
        err.print(f"error: {lost}", markup=False)
        sys.exit(1)  # not typer.Exit: click returns that as a value when it does not exit itself


@app.command()
def models() -> None:
    """List the models this machine can load without a download."""
    from personaedit.models.listing import available_models

    table = Table("model", "type", "where", "note")
    for entry in available_models():
        table.add_row(entry.spec, entry.model_type, entry.location, entry.note)
    stdout.print(table)


app.command()(demo)
app.command()(serve)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app; user errors and usage errors print one line and exit with status 2."""
    click = _click_exceptions()
    args = sys.argv[1:] if argv is None else argv
    if "edit" in args:
        register_edit_commands()
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
