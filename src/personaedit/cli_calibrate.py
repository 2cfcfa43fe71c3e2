"""`personaedit calibrate METHOD`: choose an activation method's layers and strength, or a weight edit's strength,
for a model on validation questions (see `personaedit.calibration`). Registered on the main app by `register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from personaedit.cli_shared import MODEL_HELP, err, load, status, stdout


def calibrate(
    method: str = typer.Argument(..., help="steer | npti | dpnle | palette"),
    persona: str = typer.Option(..., "--persona", "-p", help="e.g. extraversion=high"),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also fit the chosen setting and save the edit here."),
    questions: int = typer.Option(36, "--questions", min=4, help="Validation questions answered per setting."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=1, max=4096, help="Length of each reply."),
    perplexity_budget: float = typer.Option(1.5, "--perplexity-budget", help="Largest perplexity ratio allowed."),
    coherent_min: float = typer.Option(0.9, "--coherent-min", help="Smallest share of coherent replies allowed."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | mps"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure again even if this calibration is cached."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace an edit already in --out."),
) -> None:
    """Try a method's layers and strengths (palette: its update's strength) on validation questions; pick the largest
    trait effect within budget."""
    from personaedit.calibration import CALIBRATED, Budget
    from personaedit.errors import PersonaEditError
    from personaedit.persona import Persona
    from personaedit.preflight import check_device, check_output_path

    if method not in CALIBRATED:
        raise PersonaEditError(f"calibrate supports {', '.join(CALIBRATED)}, not {method!r}")
    target = Persona.parse(persona)
    if not 1 <= perplexity_budget < float("inf") or not 0 <= coherent_min <= 1:  # NaN fails both
        raise PersonaEditError("--perplexity-budget must be at least 1 and --coherent-min between 0 and 1")
    check_device(device)
    if out is not None:
        check_output_path(out, folder=True)
        if (out / "edit.json").exists() and not force:
            raise PersonaEditError(f"{out} already holds an edit; pass --force to replace it")
    result, edit = _run(method, target, model, device, out, questions, max_new_tokens,
                        Budget(perplexity_budget, coherent_min), not no_cache)
    if as_json:
        stdout.print(json.dumps(result, indent=2), markup=False)
    else:
        _print_calibration(result)
    if edit is not None:
        edit.save(out)
        err.print(f"saved the calibrated {method} edit to {out}")


def _run(method, persona, model, device, out, questions, max_new_tokens, budget, use_cache) -> tuple[dict, Any]:
    from personaedit.calibration import calibrated_edit

    lm = load(model, device)
    result = _calibration(lm, method, persona, budget=budget, questions=questions, max_new_tokens=max_new_tokens,
                          use_cache=use_cache)
    return result, calibrated_edit(lm, method, persona, result) if out is not None else None


def _calibration(lm: Any, method: str, persona: Any, **settings: Any) -> dict[str, Any]:
    """Run (or read from the cache) a calibration, its current step shown as a status line."""
    from personaedit.calibration import calibrate as run_calibration
    from personaedit.eval.text_judge import TextJudge

    judge = TextJudge.load()
    with status(f"calibrating {method} for {persona.spec()}") as shown:
        return run_calibration(lm, method, persona, judge, stage=lambda text: shown.update(f"calibrating {method}: {text}"),
                               **settings)


def _print_calibration(result: dict[str, Any]) -> None:
    from rich.table import Table

    from personaedit.calibration import Budget, within_budget

    table = Table(title=f"{result['method']} for {result['persona']} on {result['model']}: "
                        f"{result['questions']} validation questions")
    for column in ("options", "strength", "trait effect [95% CI]", "verdict", "coherent", "perplexity ×", "in budget"):
        table.add_column(column)
    budget = result["budget"]
    for trial in result["trials"]:
        effect = trial["effect"]
        within = within_budget(trial["coherent_share"], trial["perplexity_ratio"], Budget(**budget),
                               result["base_coherent_share"])
        table.add_row(json.dumps(trial["options"]) if trial["options"] else "defaults", f"{trial['strength']:g}",
                      f"{effect['mean']:+.3f} [{effect['low']:+.3f}, {effect['high']:+.3f}]", effect["verdict"],
                      f"{trial['coherent_share']:.0%}", f"{trial['perplexity_ratio']:.2f}", "yes" if within else "no")
    stdout.print(table)
    chosen = result["chosen"]
    if chosen is None:
        stdout.print("no setting stayed within the budget "
                      f"(perplexity ≤ {budget['perplexity_ratio']:g}×, coherent ≥ {budget['coherent_share']:.0%})")
    else:
        options = json.dumps(chosen["options"]) if chosen["options"] else "default options"
        stdout.print(f"chosen: {options} at strength {chosen['strength']:g}: effect "
                      f"{chosen['effect']['mean']:+.3f} [{chosen['effect']['low']:+.3f}, {chosen['effect']['high']:+.3f}]"
                      f" ({chosen['effect']['verdict']}) on validation questions")
        if not any(t["effect"]["low"] > 0 for t in result["trials"]):
            stdout.print(f"no setting moved {result['persona']} measurably (no interval above 0): {result['method']} "
                          "may not control this trait on this model")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)


def fit_calibrated(lm: Any, method: str, persona: Any, options: dict[str, Any]) -> Any:
    """`edit METHOD --calibrate`: the calibration (cached, default budget), then the edit at its choice."""
    from personaedit.calibration import calibrated_edit

    result = _calibration(lm, method, persona)
    _print_calibration(result)
    return calibrated_edit(lm, method, persona, result, **options)
