"""ROME, r-ROME core: one rank-one update of `down_proj` at one layer so that a prompt about a subject
is continued with a target word. The key is the `down_proj` input at the subject token averaged over
the prompt after short random prefixes the model wrote itself; the value is optimised at that same key
(r-ROME), and ΔW = (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*), with C = I unless `covariance` is set.

    personaedit edit rome --persona tf=T --prompt "[Your answer] {} trust" --subject I --target facts
"""

from __future__ import annotations

from typing import Callable

from personaedit.edits import BaseModelInfo, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.methods.locate import Request, ValueOptions, as_delta, check_layer, edit_request, random_prefixes
from personaedit.methods.second_moment import regularised_inverse, second_moments
from personaedit.models import LoadedModel
from personaedit.persona import Persona


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    prompt: str | None = None,
    subject: str = "I",
    target: str | None = None,
    layer: int | None = None,
    subject_token: str = "last",
    steps: int = 25,
    lr: float = 0.4,
    kl_factor: float = 0.0625,
    weight_decay: float = 1e-4,
    clamp: float = 4.0,
    prefixes: int = 5,
    prefix_length: int = 10,
    covariance: bool = False,
    samples: int = 20000,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> WeightEdit:
    """Rank-one edit (r-ROME) making PROMPT about SUBJECT continue with TARGET; the persona is recorded.

    Options:
        prompt: the prompt, with a {} slot for the subject or containing the subject (required)
        subject: the subject word whose down_proj input is the key (I, me, my, a name ...)
        target: the continuation the edited prompt should have (required)
        layer: the MLP layer to edit (default: derived from the model's depth)
        subject_token: read the key at the subject's first or last token (first, last)
        steps: at most this many Adam steps of the value optimisation (stops early at NLL < 0.05)
        lr: learning rate of the value optimisation
        kl_factor: weight of the KL term that keeps "{subject} is a" contexts unchanged
        weight_decay: weight of the ‖δ‖² penalty on the value change
        clamp: ‖δ‖ is clamped to this many times the norm of the original value
        prefixes: model-written random prefixes the key and value are averaged over (0: the bare prompt only)
        prefix_length: tokens of each random prefix
        covariance: scale the update by the inverse second moment of down_proj inputs (classic ROME)
        samples: tokens of neutral text the second moment is estimated from (with --covariance)
        seed: seed of the random prefixes
    """
    if prompt is None or target is None:
        raise PersonaEditError("rome needs --prompt (with the subject or a {} slot) and --target")
    request = Request.of(prompt, subject, target)
    chosen = check_layer(lm, layer)
    options = ValueOptions(steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm_factor=clamp)
    inverse = None
    if covariance:
        inverse = regularised_inverse(second_moments(lm, [chosen], samples)[chosen])
    contexts = random_prefixes(lm, prefixes, prefix_length, seed)
    update = edit_request(lm, request, chosen, contexts, options, token=subject_token, inverse_moment=inverse)
    if on_progress:
        on_progress(1, 1)
    recorded = {"prompt": request.template, "subject": request.subject, "target": request.target, "layer": chosen,
                "subject_token": subject_token, "steps": steps, "lr": lr, "kl_factor": kl_factor,
                "weight_decay": weight_decay, "clamp": clamp, "prefixes": prefixes, "prefix_length": prefix_length,
                "covariance": covariance, "samples": samples if covariance else None, "seed": seed,
                "fitted": update.info}
    return WeightEdit(method="rome", persona=persona, options=recorded, base=BaseModelInfo.of(lm),
                      deltas={lm.arch.mlp_out_param(chosen): as_delta(lm, chosen, update.u[:, None], update.v[:, None])})
