"""`personaedit edit METHOD` (one command per method in the registry, its options from the method's fit),
`personaedit info` (an edit in words, from `Edit.describe`) and `personaedit mend train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from personaedit.cli_shared import MODEL_HELP, err, escape, flag_parameter, load, progress, stdout
from personaedit.errors import InputFileError
from personaedit.method_options import MethodSpec
from personaedit.option_groups import flag_of
from personaedit.preflight import check_device, check_output_path

edit_app = typer.Typer(help="Fit an edit with a method and save it: personaedit edit METHOD --persona SPEC --out DIR.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
mend_app = typer.Typer(help="Train the MEND editor of a model (used by `personaedit edit mend`).",
                       no_args_is_help=True, pretty_exceptions_enable=False)


def _edit_command(spec: MethodSpec):
    """A typer command for one method, its options those of the method's fit (as method_options.json lists them)."""
    import inspect

    name = spec.name

    def command(model: str, persona: str, out: Path, device: Optional[str], force: bool, **options: Any) -> None:
        from personaedit.edits import Edit
        from personaedit.methods import fit_edit
        from personaedit.persona import Persona

        target = Persona.parse(persona)
        check_device(device)
        check_output_path(out, folder=True)
        if out.exists() and any(out.iterdir()) and not (out / "edit.json").exists():
            raise InputFileError(f"refusing to overwrite {out}: it exists and is not an edit folder")
        if (out / "edit.json").exists() and not force:
            raise InputFileError(f"{out} already holds an edit; pass --force to replace it")
        lm = load(model, device)
        if options.pop("calibrate", False):
            from personaedit.cli_calibrate import fit_calibrated

            edit: Edit = fit_calibrated(lm, name, target, options)
        else:
            with progress() as bars:
                task = bars.add_task(f"{name}: fitting", total=None)  # off a terminal: a line every 30 s
                edit = fit_edit(name, lm, target, **options,
                                on_progress=lambda done, total: bars.update(task, completed=done, total=total))
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
    if spec.calibrated:
        params.append(inspect.Parameter("calibrate", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--calibrate", help="Choose layers and strength (a weight edit: strength) for this model on "
                                       "validation questions first "
                                       "(`personaedit calibrate`; cached); strength 1 then means the chosen one.")))
    params += [flag_parameter(option.name, option.annotation, option.default_or_empty, option.help,
                              flag_of(option.name)) for option in spec.options]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = f"{spec.pretty_name}: {spec.summary}\n\nReference: {spec.reference}."
    return command


def register_edit_commands() -> None:
    """One `edit METHOD` command per registered method, from method_options.json (no method, no torch is
    imported until a command runs), only for a command line that uses `edit`."""
    from personaedit import method_options

    if edit_app.registered_commands:
        return
    for name, spec in method_options.load().items():
        edit_app.command(name=name)(_edit_command(spec))


def info(
    edit_dir: Path = typer.Argument(..., help="An edit folder."),
    as_json: bool = typer.Option(False, "--json", help="Print edit.json as it is."),
) -> None:
    """Show what an edit contains: method (and its paper), persona, base model, and where it acts."""
    import dataclasses

    from personaedit.edits import load_edit
    from personaedit.methods import all_methods

    edit = load_edit(edit_dir)
    if as_json:
        stdout.print(json.dumps(edit.metadata(), indent=2, sort_keys=True), markup=False)
        return
    description = edit.describe()
    method = all_methods().get(edit.method)
    if method is not None:
        line = f"{method.pretty_name}; reference: {method.reference}"
        description = dataclasses.replace(description, lines=(line, *description.lines))
    _print_description(description, indent="")


def _print_description(description: Any, indent: str) -> None:
    stdout.print(f"{indent}[bold]{escape(description.title)}[/bold]")
    for line in description.lines:
        stdout.print(f"{indent}  {line}", markup=False)
    if description.table is not None:
        columns, rows = description.table
        table = Table(*columns)
        for row in rows:
            table.add_row(*row)
        stdout.print(table)
    for weight, part in description.parts:
        stdout.print(f"{indent}  part at weight {weight:g}:")
        _print_description(part, indent + "    ")


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
    lm = load(model, device)
    with progress() as bars:
        task = bars.add_task("mend: training the editor", total=steps)
        _, summary = train_editor(lm, out, config, data=data, resume=not fresh,
                                  on_progress=lambda done, total: bars.update(task, completed=done, total=total))
    stdout.print(json.dumps(summary, indent=2, sort_keys=True), markup=False)
