"""MEMIT: the adjustment queries of PALETTE applied as one batch, spread over a range of layers.

For each request a target residual z (at the subject token, after the last layer of the range) is
optimised once; then for each layer l of the range, bottom up, on the model as the lower layers left it:
K = keys at l (one column per request, averaged over the prefixed prompts), R = (z − current residual)
/ (layers left), ΔW_l = R Kᵀ (λ·C + K Kᵀ)⁻¹ with C = E[k kᵀ] of `down_proj` inputs over a neutral corpus
(cached, see second_moment.py), solved in float64 and kept as rank-n factors (u = R, v = (λC + KKᵀ)⁻¹K).

The range defaults to the five layers ending at PALETTE's layer (15/28 of the depth); λ = 15,000 as in
the reference configurations.
"""

from __future__ import annotations

import contextlib

import torch

from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.methods.contrast import parse_layers
from personaedit.methods.locate import default_layer, random_prefixes, tokenise_request
from personaedit.methods.rank_one import as_delta
from personaedit.methods.value import ValueOptions, keys_and_outputs, optimise_delta
from personaedit.methods.palette import persona_requests
from personaedit.methods.second_moment import second_moments
from personaedit.models import LoadedModel
from personaedit.persona import Persona
from personaedit.progress import Progress


def default_layers(num_layers: int, count: int = 5) -> list[int]:
    last = default_layer(num_layers)
    return list(range(max(0, last - count + 1), last + 1))


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    queries: int = 12,
    layers: str = "auto",
    mom2_weight: float = 15000.0,
    samples: int = 20000,
    value: ValueOptions = ValueOptions(),
    on_progress: Progress | None = None,
) -> WeightEdit:
    """Multi-layer batch edit (MEMIT) from the persona's adjustment queries.

    Options:
        queries: adjustment queries per targeted pole, 1-16, edited as one batch
        layers: MLP layers to spread the update over: 12, 12-16, 4,8,12 or auto (the five ending at 15/28 of the depth)
        mom2_weight: λ, the weight of the second moment of down_proj inputs against the new keys
        samples: tokens of neutral text the second moment is estimated from (cached per model and layer)

    With the value optimisation's options (ValueOptions), which here optimise each request's target residual.
    """
    if mom2_weight <= 0:
        raise PersonaEditError(f"mom2_weight must be > 0, got {mom2_weight}")
    chosen = parse_layers(layers, lm.arch.num_layers, default_layers(lm.arch.num_layers))
    top = chosen[-1]
    requests = persona_requests(persona, queries)
    prefixes = random_prefixes(lm, value.prefixes, value.prefix_length, value.seed)
    total = len(requests) + len(chosen)
    moments = second_moments(lm, chosen, samples)

    tokenised, targets = [], []
    for done, (request, magnitude, _) in enumerate(requests):
        tokens = tokenise_request(lm, request, prefixes, value.subject_token)
        optimised = optimise_delta(lm, request, tokens, ("residual", top), value)
        tokenised.append(tokens)
        targets.append(optimised.reference + optimised.delta * magnitude)
        if on_progress:
            on_progress(done + 1, total)
    z = torch.stack(targets, dim=1).double()  # [hidden, n]

    deltas: dict[str, Delta] = {}
    with contextlib.ExitStack() as applied:
        for index, layer in enumerate(chosen):
            read = [keys_and_outputs(lm, tokens, layer, ("residual", top)) for tokens in tokenised]
            keys = torch.stack([k for k, _ in read], dim=1).double()  # [mlp, n]
            current = torch.stack([r for _, r in read], dim=1).double()
            residual = (z - current) / (len(chosen) - index)
            system = mom2_weight * moments[layer].to(keys.device) + keys @ keys.T
            v = torch.linalg.solve(system, keys)  # (λC + KKᵀ)⁻¹K: the system is symmetric
            name = lm.arch.mlp_out_param(layer)
            deltas[name] = as_delta(lm, layer, residual, v)
            applied.enter_context(WeightEdit(method="memit", deltas={name: deltas[name]}).apply(lm))
            if on_progress:
                on_progress(len(requests) + index + 1, total)
    # The layers the fit resolved; fit_edit records every option beside them.
    return WeightEdit(method="memit", persona=persona, options={"layers": chosen}, base=BaseModelInfo.of(lm), deltas=deltas)
