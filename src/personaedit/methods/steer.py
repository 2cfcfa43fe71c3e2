"""Mean-difference steering (CAA / ActAdd style): v = mean(high) − mean(low) of residual-stream
activations at the last prompt token, for the same questions under high- and low-pole personas;
at inference add strength·level·v to the residual stream at one layer, or at several.

The layer is given or chosen where a linear probe separates the poles best on held-out pairs
(among the middle half of the layers; ties go to the larger separation relative to the spread).
Given several layers (`10-20`, `4,8,12`), each gets its own layer's mean difference and the strength is shared
evenly among them, as repeng's control vectors act on a band of layers: the residual stream carries each
addition onwards, so the push sums while each layer's is small (on the default model, with the prompt steered
too, repeng's band moved extraversion=high a little more than one layer at lower perplexity; without the
prompt, less; docs/BENCHMARKS.md).
With `read_at=reply` the poles' activations are read where repeng reads its dataset: at the last word of the same
start of a reply (a few words of neutral text) after both personas' prompts, not at the last prompt token. The
poles differ less there, so it needs a larger `scale`. With `instruction_only` the prompt is the persona's
description alone (no question), as repeng's one instruction per pole; on the default model that reading on repeng's
band, the prompt steered too, is the calibrated setting for extraversion both ways (docs/BENCHMARKS.md).
`scale` sets what strength 1 means: 8 × the mean difference, where steering at the auto-chosen layer
of the default model moved the judged extraversion of replies from -0.33 to +0.29 with every reply
coherent (16 × gave +0.55); the raw difference (scale 1) barely shows in generated text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.methods.capture import ActivationOptions, capture_pairs
from personaedit.errors import PersonaEditError
from personaedit.methods.contrast import (contrastive_pairs, instruction_pairs, parse_layers, per_dimension, probe_accuracy,
                                          reply_openings)
from personaedit.models import LoadedModel
from personaedit.persona import Dimension, Persona
from personaedit.progress import Progress


READ_AT = ("prompt", "reply")
DIRECTIONS = ("mean", "pca")


def _principal_part(differences: torch.Tensor) -> torch.Tensor:
    """The mean of paired differences [n, width] projected on their top principal axis (centred, as scikit-learn's
    PCA in repeng): repeng's unit direction, signed and sized by the mean difference so strengths stay comparable."""
    centred = differences - differences.mean(0)
    axis = torch.linalg.svd(centred.double(), full_matrices=False).Vh[0].to(differences.dtype)
    return axis * (differences.mean(0) @ axis)


def _separation(high: torch.Tensor, low: torch.Tensor) -> float:
    spread = torch.cat([high - high.mean(0), low - low.mean(0)]).norm(dim=1).mean()
    return float((high.mean(0) - low.mean(0)).norm() / (spread + 1e-8))


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    layer: str = "auto",
    pairs: int = 256,
    scale: float = 8.0,
    equal_norms: bool = False,
    read_at: str = "prompt",
    direction: str = "mean",
    instruction_only: bool = False,
    activation: ActivationOptions = ActivationOptions(),
    on_progress: Progress | None = None,
) -> ActivationEdit:
    """Mean-difference residual steering from contrastive persona pairs.

    Options:
        layer: residual layer to steer: a number, auto (the best linear-probe layer of the middle half), or several
            (10-20 or 4,8,12: each with its own mean difference, the strength shared evenly among them)
        pairs: contrastive prompt pairs per dimension
        scale: what strength 1 means, in multiples of the mean difference
        equal_norms: on a band, give every layer's direction the band's mean norm (as repeng's unit directions at
            one coefficient) instead of its own mean difference's, which grows with depth
        read_at: where the poles' activations are read: prompt (the last prompt token, CAA) or reply (the last
            word of the same start of a reply after both personas, as repeng reads its dataset)
        direction: mean (the mean paired difference, CAA) or pca (its part along the top principal axis of the
            paired differences, centred, as repeng's pca_diff finds its direction)
        instruction_only: with read_at=reply, the persona's description alone as the user turn (no question, no
            system message), as repeng's one instruction per pole

    With the options activation methods share (ActivationOptions).
    """
    if read_at not in READ_AT:
        raise PersonaEditError(f"read_at must be one of {', '.join(READ_AT)}, not {read_at!r}")
    if instruction_only and read_at != "reply":
        raise PersonaEditError("instruction_only needs read_at=reply: without a question the prompt ends in the persona's "
                               "own words, where the poles differ by their wording alone")
    if direction not in DIRECTIONS:
        raise PersonaEditError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    candidates = parse_layers(layer, lm.arch.num_layers, lm.arch.middle_layers(0.25, 0.75))
    band = str(layer) != "auto" and len(candidates) > 1
    chosen: dict[str, dict[str, Any]] = {}

    def fit_one(dim: Dimension, level: float) -> list[Intervention]:
        if instruction_only:
            data = instruction_pairs(dim, pairs, seed=activation.seed)
        else:
            data = contrastive_pairs(dim, pairs, seed=activation.seed)
        if read_at == "reply":
            data = dataclasses.replace(data, openings=reply_openings(pairs, seed=activation.seed))
        sites = [("residual", l) for l in candidates]
        high, low = capture_pairs(lm, data, sites, batch_size=activation.batch_size, on_progress=on_progress)
        if band:
            steered = candidates
            chosen[dim.name] = {"layers": steered}
        else:
            ranked = {l: (probe_accuracy(high[s], low[s]), _separation(high[s], low[s])) for l, s in zip(candidates, sites)}
            best = max(candidates, key=lambda l: ranked[l])
            steered = [best]
            chosen[dim.name] = {"layer": best, "probe_accuracy": ranked[best][0], "separation": ranked[best][1]}
        paired = {l: high[("residual", l)] - low[("residual", l)] for l in steered}
        differences = {l: _principal_part(d) if direction == "pca" else d.mean(0) for l, d in paired.items()}
        if equal_norms:
            mean_norm = sum(d.norm() for d in differences.values()) / len(differences)
            differences = {l: d * (mean_norm / d.norm().clamp_min(1e-8)) for l, d in differences.items()}
        share = level * scale / len(steered)  # a band shares the strength evenly among its layers
        return [Intervention("residual", l, differences[l] * share, positions=activation.positions) for l in steered]

    interventions = per_dimension(persona, fit_one)
    # What the fit found; fit_edit records every option beside it.
    return ActivationEdit(method="steer", persona=persona, options={"fitted": chosen}, base=BaseModelInfo.of(lm),
                          interventions=interventions)
