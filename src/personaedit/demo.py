"""The demo: the default model answering held-out questions plainly, prompted, and steered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from personaedit.data import records
from personaedit.edits import Edit
from personaedit.methods import fit_edit
from personaedit.methods.prompt import prompt_edit
from personaedit.models import LoadedModel, generate
from personaedit.persona import Persona


@dataclass
class DemoResult:
    persona: Persona
    questions: list[str]
    columns: dict[str, list[str]]  # column title -> one reply per question


def demo_questions(persona: Persona, count: int = 3) -> list[str]:
    """Held-out (test split) situational questions for the persona's first Big Five trait, else neutral ones."""
    traits = [dim.name for dim in persona.dimensions() if dim.kind == "big5"]
    pool = records("situational_questions", "test", trait=traits[0]) if traits else []
    pool += records("neutral_questions", "test")
    return [row["question"] for row in pool[:count]]


def run_demo(
    lm: LoadedModel,
    persona: Persona,
    questions: list[str],
    *,
    max_new_tokens: int = 48,
    steer_pairs: int = 128,
    on_step: Callable[[str], None] | None = None,
) -> DemoResult:
    """Answer `questions` with the plain model, under a persona prompt, and steered towards each pole."""
    if on_step:
        on_step("fitting a steering vector (cached after the first run)")
    steer = fit_edit("steer", lm, persona, pairs=steer_pairs)
    edits: dict[str, Edit | None] = {
        "plain model": None,
        f"prompt: {persona.spec()}": prompt_edit(persona),
        f"steer: {persona.spec()}": steer,
        f"steer: {persona.scaled(-1).spec()}": -steer,
    }
    columns: dict[str, list[str]] = {}
    for title, edit in edits.items():
        if on_step:
            on_step(title)
        if edit is None:
            columns[title] = generate(lm, questions, max_new_tokens=max_new_tokens)
        else:
            with edit.apply(lm):
                columns[title] = generate(lm, questions, max_new_tokens=max_new_tokens)
    return DemoResult(persona, questions, columns)
