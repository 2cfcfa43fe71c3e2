"""ROME, r-ROME core: one rank-one update of `down_proj` at one layer so that a prompt about a subject
is continued with a target word. The key is the `down_proj` input at the subject token averaged over
the prompt after short random prefixes the model wrote itself; the value is optimised at that same key
(r-ROME), and ΔW = (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*), with C = I unless `covariance` is set.

    personaedit edit rome --persona tf=T --prompt "[Your answer] {} trust" --subject I --target facts
"""

from __future__ import annotations

from personaedit.edits import BaseModelInfo, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.methods.locate import Request, check_layer, random_prefixes
from personaedit.methods.rank_one import as_delta, edit_request
from personaedit.methods.value import ValueOptions
from personaedit.methods.second_moment import inverse_second_moment
from personaedit.models import LoadedModel
from personaedit.persona import Persona
from personaedit.progress import Progress


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    prompt: str | None = None,
    subject: str = "I",
    target: str | None = None,
    layer: int | None = None,
    covariance: bool = False,
    samples: int = 20000,
    value: ValueOptions = ValueOptions(),
    on_progress: Progress | None = None,
) -> WeightEdit:
    """Rank-one edit (r-ROME) making PROMPT about SUBJECT continue with TARGET; the persona is recorded.

    Options:
        prompt: the prompt, with a {} slot for the subject or containing the subject (required)
        subject: the subject word whose down_proj input is the key (I, me, my, a name ...)
        target: the continuation the edited prompt should have (required)
        layer: the MLP layer to edit (default: derived from the model's depth)
        covariance: scale the update by the inverse second moment of down_proj inputs (classic ROME)
        samples: tokens of neutral text the second moment is estimated from (with --covariance)

    With the value optimisation's options (ValueOptions).
    """
    if prompt is None or target is None:
        raise PersonaEditError("rome needs --prompt (with the subject or a {} slot) and --target")
    request = Request.of(prompt, subject, target)
    chosen = check_layer(lm, layer)
    inverse = inverse_second_moment(lm, chosen, samples) if covariance else None
    prefixes = random_prefixes(lm, value.prefixes, value.prefix_length, value.seed)
    update = edit_request(lm, request, chosen, prefixes, value, inverse_moment=inverse)
    if on_progress:
        on_progress(1, 1)
    # What the fit resolved; fit_edit records every option beside it.
    recorded = {"prompt": request.template, "subject": request.subject, "target": request.target, "layer": chosen,
                "samples": samples if covariance else None, "fitted": update.info}
    return WeightEdit(method="rome", persona=persona, options=recorded, base=BaseModelInfo.of(lm),
                      deltas={lm.arch.mlp_out_param(chosen): as_delta(lm, chosen, update.u[:, None], update.v[:, None])})
