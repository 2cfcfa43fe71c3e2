"""`personaedit eval` (measure a model and the effect of edits on it) and `personaedit demo` (one persona by
each method family, side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from personaedit.cli_shared import MODEL_HELP, err, escape, load, load_edits, progress, staged, status, stdout
from personaedit.errors import InputFileError
from personaedit.preflight import check_device, check_output_path


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
    composed = load_edits(edit)
    lm = load(model, device)
    with progress() as bars:
        on_progress = staged(bars)

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
    lm = load(model)
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
        table.add_row(escape(question), *(f"{escape(replies[row])} [dim]({result.scores[t][row]:+.2f})[/dim]"
                                           for t, replies in result.columns.items()))
    stdout.print(table)
    stdout.print("judge: the offline text judge's score of each reply towards the persona (-1 … +1); effect: per question, "
                 f"the column's score − the plain model's, with its 95% interval over {len(result.questions)} question(s) "
                 "(Student's t: few questions, a wide interval; `personaedit eval` measures on 100 held-out questions)")
    write_demo_html(result, lm.spec, html_path)
    err.print(f"html -> {html_path}")
