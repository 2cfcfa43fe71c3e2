"""PROMPT (P²-style): a system prompt of the target poles' adjectives with intensity words.

Strength scales every level: it picks the intensity word ('a bit', none, 'very', 'extremely') and how
many adjectives are listed; a negative strength describes the opposite poles.
"""

from __future__ import annotations

from personaedit.edits import ContextEdit
from personaedit.edits.context import render_prompt
from personaedit.models import LoadedModel
from personaedit.persona import Persona


def prompt_edit(persona: Persona | str, *, adjectives: int | None = None) -> ContextEdit:
    """A persona prompt edit; needs no model."""
    persona = Persona.parse(persona)
    recorded = {"adjectives": adjectives} if adjectives else {}
    return ContextEdit.of_rendering(render_prompt(persona, recorded, 1.0), method="prompt", persona=persona,
                                    options=recorded)


def fit(lm: LoadedModel, persona: Persona, *, adjectives: int | None = None) -> ContextEdit:  # noqa: ARG001
    """System prompt with adjectives of the target poles and intensity words (P²-style).

    Options:
        adjectives: adjectives per trait in the prompt (default: all of the pole's)
    """
    return prompt_edit(persona, adjectives=adjectives)
