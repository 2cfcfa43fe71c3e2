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
    recorded = {"k": k, "seed": seed}
    # The first k demonstrations, and the spares that stand in for one whose topic a message mentions.
    return ContextEdit.of_rendering(render_ike(persona, recorded, 1.0), method="ike", persona=persona, options=recorded)
