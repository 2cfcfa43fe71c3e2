"""MEND (PersonalityEdit baseline): a trained editor turns the gradient of one edit example into a weight
update. The edit descriptor is (topic, target personality); the edit example is an opinion on the topic in
the target pole (the given text, the project's opinion when it has one, else the model's own reply under the
persona prompt). One forward/backward gives the gradient's rank-one factors at the last MLP layers, one
editor pass transforms them, and the result is a WeightEdit kept as low-rank factors (rank = answer tokens).

The editor is trained once per model (`personaedit mend train`, see mend_training.py) and reused.
"""

from __future__ import annotations

from pathlib import Path

from personaedit.data import records
from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.errors import PersonaEditError, PersonaSpecError
from personaedit.data.external import EDIT_QUESTION
from personaedit.methods.mend_editor import (TrainConfig, default_editor_dir, gradient_factors, has_editor, load_editor,
                                             update_factors)
from personaedit.methods.mend_training import train_editor
from personaedit.models import LoadedModel, generate
from personaedit.persona import Dimension, Persona
from personaedit.progress import Progress


def target_text(lm: LoadedModel, dim: Dimension, level: float, topic: str) -> str:
    """An opinion on `topic` in the pole of `level`: the project's (any split) or the model's own under the persona prompt."""
    pole = dim.pole(level).name
    rows = records("opinions", topic=topic, trait=dim.name, pole=pole)
    if rows:
        return rows[0]["text"]
    from personaedit.methods.prompt import prompt_edit

    with prompt_edit(Persona.from_mapping({dim.name: level})).apply(lm):
        reply = generate(lm, [EDIT_QUESTION.format(topic)], max_new_tokens=60)[0]
    return reply.strip() or f"I have strong feelings about {topic}."


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    topic: str,
    text: str | None = None,
    editor: str | None = None,
    train: bool = False,
    on_progress: Progress | None = None,
) -> WeightEdit:
    """MEND: a trained hyper-network maps an edit example's gradient to a low-rank update of the last MLP layers.

    Options:
        topic: the topic whose opinions are edited (required), e.g. coffee
        text: the edit example's answer (default: the project's opinion in the target pole, else the model's
            own reply under the persona prompt)
        editor: folder of a trained MEND editor (default: the model's editor in the cache)
        train: train the editor first when the folder has none (about 16 minutes on the default model)
    """
    if not topic.strip():
        raise PersonaEditError("mend edits the opinions on one topic: give --topic (e.g. --topic coffee)")
    dims = [(d, level) for d, (_, level) in zip(persona.dimensions(), persona.levels) if level != 0]
    if any(d.kind != "big5" for d, _ in dims) or not dims:
        raise PersonaSpecError("mend edits Big Five traits (e.g. extraversion=high); MBTI axes have no topic opinions")
    if text is not None and len(dims) != 1:
        raise PersonaEditError("--text is the opinion for a single-trait persona")
    folder = Path(editor) if editor else default_editor_dir(lm)
    if has_editor(folder):
        trained = load_editor(folder, lm)
    elif train:
        trained, _ = train_editor(lm, folder, TrainConfig(), on_progress=on_progress)
    else:
        raise PersonaEditError(f"no MEND editor for {lm.spec} in {folder}: train one with "
                               f"`personaedit mend train --model {lm.spec}` or pass --train")
    pairs = [(EDIT_QUESTION.format(topic), text if text is not None else target_text(lm, d, level, topic))
             for d, level in dims]
    update = update_factors(trained, gradient_factors(lm, trained.layers, pairs))
    deltas = {}
    for layer, (u_tilde, scaled_delta) in update.items():
        # ΔW = scaled_deltaᵀ u_tilde in [out, in] layout
        u, v = lm.arch.mlp_out_factors(layer, scaled_delta.T.cpu().contiguous(), u_tilde.T.cpu().contiguous())
        deltas[lm.arch.mlp_out_param(layer)] = Delta(u=u, v=v)
    recorded = {"topic": topic, "editor": str(folder), "layers": trained.layers, "pairs": [list(p) for p in pairs]}
    return WeightEdit(method="mend", persona=persona, options=recorded, base=BaseModelInfo.of(lm), deltas=deltas)
