"""IKE (in-context editing): k demonstrations of question -> answer in the target personality, drawn
from the training split, on other topics than the message being answered.

Strength picks the pole (its sign, times each level's sign); demonstrations whose topic the message
mentions are skipped, so a held-out topic never sees its own answer.
"""

from __future__ import annotations

from personaedit.edits import ContextEdit
from personaedit.edits.context import render_ike
from personaedit.models import LoadedModel
from personaedit.persona import Persona


def fit(lm: LoadedModel, persona: Persona, *, k: int = 4, seed: int = 0) -> ContextEdit:  # noqa: ARG001
    """k demonstrations in the target personality from the training split, on other topics.

    Options:
        k: number of demonstrations placed before each question
        seed: seed of the demonstration draw
    """
    options = {"k": k, "seed": seed}
    context = render_ike(persona, options, 1.0)
    return ContextEdit(method="ike", persona=persona, options=options, demonstrations=context.demonstrations[:k])
