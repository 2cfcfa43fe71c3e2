"""MEMIT: the adjustment queries of PALETTE applied as one batch, spread over a range of layers.

For each request a target residual z (at the subject token, after the last layer of the range) is
optimised once; then for each layer l of the range, bottom up, on the model as the lower layers left it:
K = keys at l (one column per request, averaged over the prefixed contexts), R = (z − current residual)
/ (layers left), ΔW_l = R Kᵀ (λ·C + K Kᵀ)⁻¹ with C = E[k kᵀ] of `down_proj` inputs over a neutral corpus
(cached, see second_moment.py), solved in float64 and kept as rank-n factors (u = R, v = (λC + KKᵀ)⁻¹K).

The range defaults to the five layers ending at PALETTE's layer (15/28 of the depth); λ = 15,000 as in
the reference configurations.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.methods.contrast import parse_layers
from personaedit.methods.locate import (ValueOptions, as_delta, default_layer, keys_and_outputs, optimise_delta,
                                        random_prefixes, read_in_contexts)
from personaedit.methods.palette import persona_requests
from personaedit.methods.second_moment import second_moments
from personaedit.models import LoadedModel
from personaedit.persona import Persona


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
    subject_token: str = "last",
    steps: int = 25,
    lr: float = 0.4,
    kl_factor: float = 0.0625,
    weight_decay: float = 1e-4,
    clamp: float = 4.0,
    prefixes: int = 5,
    prefix_length: int = 10,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> WeightEdit:
    """Multi-layer batch edit (MEMIT) from the persona's adjustment queries.

    Options:
        queries: adjustment queries per targeted pole, 1-16, edited as one batch
        layers: MLP layers to spread the update over: 12, 12-16, 4,8,12 or auto (the five ending at 15/28 of the depth)
        mom2_weight: λ, the weight of the second moment of down_proj inputs against the new keys
        samples: tokens of neutral text the second moment is estimated from (cached per model and layer)
        subject_token: read the keys at the subject's first or last token (first, last)
        steps: at most this many Adam steps per target residual (stops early at NLL < 0.05)
        lr: learning rate of the target optimisation
        kl_factor: weight of the KL term that keeps "{subject} is a" contexts unchanged
        weight_decay: weight of the ‖δ‖² penalty on the residual change
        clamp: ‖δ‖ is clamped to this many times the norm of the original residual
        prefixes: model-written random prefixes the keys and targets are averaged over
        prefix_length: tokens of each random prefix
        seed: seed of the random prefixes
    """
    if mom2_weight <= 0:
        raise PersonaEditError(f"mom2_weight must be > 0, got {mom2_weight}")
    chosen = parse_layers(layers, lm.arch.num_layers, default_layers(lm.arch.num_layers))
    top = chosen[-1]
    requests = persona_requests(persona, queries)
    options = ValueOptions(steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm_factor=clamp)
    texts = random_prefixes(lm, prefixes, prefix_length, seed)
    total = len(requests) + len(chosen)
    moments = second_moments(lm, chosen, samples)

    contexts, targets = [], []
    for done, (request, scale, _) in enumerate(requests):
        ctx = read_in_contexts(lm, request, texts, subject_token)
        value = optimise_delta(lm, request, ctx, ("residual", top), options, token=subject_token)
        contexts.append(ctx)
        targets.append(value.reference + value.delta * scale)
        if on_progress:
            on_progress(done + 1, total)
    z = torch.stack(targets, dim=1).double()  # [hidden, n]

    deltas: dict[str, Delta] = {}
    with contextlib.ExitStack() as applied:
        for index, layer in enumerate(chosen):
            read = [keys_and_outputs(lm, ctx, layer, ("residual", top)) for ctx in contexts]
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
    recorded = {"queries": queries, "layers": chosen, "mom2_weight": mom2_weight, "samples": samples,
                "subject_token": subject_token, "steps": steps, "lr": lr, "kl_factor": kl_factor,
                "weight_decay": weight_decay, "clamp": clamp, "prefixes": prefixes, "prefix_length": prefix_length,
                "seed": seed}
    return WeightEdit(method="memit", persona=persona, options=recorded, base=BaseModelInfo.of(lm), deltas=deltas)
