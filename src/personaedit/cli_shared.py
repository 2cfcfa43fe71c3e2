"""What every `personaedit` command module uses: the two consoles, progress bars and status lines (plain
lines off a terminal, see cli_progress.py), loading a model or the edits named on the command line.

The command modules (cli.py and the cli_*.py beside it) import from here, never from each other, so that
cli.py can register them without an import circle.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from personaedit.preflight import check_device, check_dtype, check_model_path, parse_edit_option

stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line stays one line

MODEL_HELP = "default | a local HF folder | a .gguf file | a hub id already in the local cache"


def progress() -> Any:
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


def staged(bars: Progress):
    """A callback `(stage, done, total)` that shows one bar per stage."""
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    return on_progress


def load(model: str, device: Optional[str] = None, dtype: Optional[str] = None, trust_remote_code: bool = False):
    """The model, checked options first, with a status line while it loads."""
    from personaedit.models import load_model

    check_model_path(model)
    check_device(device)
    check_dtype(dtype)

    with status(f"loading {model} (the first use of a GGUF file converts it once, ~30 s)"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def load_edits(specs: List[str]):
    """The edits of repeated `--edit DIR[:STRENGTH]` options, composed; None without any."""
    from personaedit.edits import ComposedEdit, load_edit

    if not specs:
        return None
    parsed = [parse_edit_option(spec) for spec in specs]
    edits = [load_edit(folder) for folder, _ in parsed]
    return ComposedEdit.of(*edits, weights=[s for _, s in parsed])


def escape(text: str) -> str:
    """`text` with rich markup characters escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def option_type(annotation: Any) -> Any:
    """`int | None` -> Optional[int], which typer understands on every Python version."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[args[0]]
    return annotation


def flag_parameter(name: str, annotation: Any, default: Any, help: Optional[str], flag: str,  # noqa: A002
                   min: Optional[float] = None) -> inspect.Parameter:
    """A keyword parameter typer reads as the flag of one option (required when `default` is empty): how
    `edit METHOD` and `vector train` turn declared options into flags."""
    import typer

    required = default is inspect.Parameter.empty
    limits = {} if min is None else {"min": min}
    if option_type(annotation) in (bool, "bool") and default is True:  # on by default: it must be possible to turn off
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option_type(annotation),
                             default=typer.Option(... if required else default, flag, help=help, **limits))
