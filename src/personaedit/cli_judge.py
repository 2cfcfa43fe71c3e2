"""`personaedit judge` (score texts with the offline text judge), `judge train` and `judge evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from personaedit.cli_shared import err, progress, status, stdout
from personaedit.errors import InputFileError
from personaedit.preflight import check_output_path

judge_app = typer.Typer(help="Score texts on the Big Five and MBTI axes with the offline text judge.",
                        pretty_exceptions_enable=False)


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
    with progress() as bars:
        task = bars.add_task("judging", total=len(rows))
        found = scorer.assess([r["text"] for r in rows], on_progress=lambda done, _: bars.update(task, completed=done))
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
    with progress() as bars:
        task = bars.add_task("training the judge", total=None)
        result = train_text_judge(out, seed=seed, adapter=AdapterConfig() if adapter else None, encoder_name=key, form=form,
                                  on_progress=lambda done, total: bars.update(task, completed=done, total=total))
    stdout.print(json.dumps(result, indent=2, sort_keys=True, default=str), markup=False)


@judge_app.command("evaluate")
def judge_evaluate(
    head: Optional[Path] = typer.Option(None, "--head", help="A trained head (default: the shipped one)."),
    split: str = typer.Option("test", "--split", help="train | validation | test"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a reliability diagram (PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print every measure as JSON instead of tables."),
) -> None:
    """Pole accuracy, off-target |score|, trait intercorrelation and calibration on a split and on the check set."""
    from personaedit.eval.judge_metrics import reliability_plot, specificity_report
    from personaedit.eval.text_judge import DIMENSIONS
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
