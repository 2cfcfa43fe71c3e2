"""DPN-LE: dual personality neuron localization and editing.

1. N contrastive pairs per trait (a situational or neutral question under a high- and a low-pole
   persona description, training split).
2. MLP hidden activations (the input of down_proj) at the last prompt token, per layer in a range.
3. Per layer: s = mean(high) − mean(low); Cohen's d per neuron with the pooled std.
4. Keep neuron j if |s_j| > quantile_q(|s|) and |d_j| > τ: high-exclusive (d > τ) and low-exclusive
   (d < −τ) neurons, disjoint by construction.
5. At generated tokens add γ·s on the kept neurons; the sign of γ (strength × level) picks the pole.

Defaults measured on the default model (1,000 pairs, extraversion, middle-half layers): τ = 0.8 (the
paper's Llama-3-8B value) keeps 7 of 23,040 neurons and moves nothing; τ = 0.3 (its Qwen2.5-7B value)
keeps 104 (0.45%, the paper's ~0.5%). `scale` sets what strength 1 means: γ = 8 × strength. On that
model the judged extraversion of replies to validation questions went −0.01, −0.10, −0.20, −0.35, −0.45
for γ = −8, −4, 0, 4, 8 (≥ 94% coherent): monotone, but *against* s's direction; docs/BENCHMARKS.md has
what the benchmark found for every pole.
"""

from __future__ import annotations

from typing import Callable

import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.methods.capture import capture_pairs
from personaedit.methods.contrast import cohens_d, contrastive_pairs, parse_layers, per_dimension
from personaedit.models import LoadedModel
from personaedit.persona import Dimension, Persona


def select_neurons(high: torch.Tensor, low: torch.Tensor, quantile: float, min_d: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(steering vector s, high-exclusive indices, low-exclusive indices) for one layer."""
    s = high.mean(0) - low.mean(0)
    d = cohens_d(high, low)
    large = s.abs() > torch.quantile(s.abs(), quantile)
    return s, torch.nonzero(large & (d > min_d)).flatten(), torch.nonzero(large & (d < -min_d)).flatten()


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    pairs: int = 1000,
    quantile: float = 0.995,
    min_d: float = 0.3,
    layers: str = "auto",
    scale: float = 8.0,
    prompt_too: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> ActivationEdit:
    """Dual personality neurons (|s| quantile and |Cohen's d| filter), sparse additive edit.

    Options:
        pairs: contrastive prompt pairs per dimension (the paper: 1,000)
        quantile: keep neurons whose |s| exceeds this quantile of the layer's |s|
        min_d: keep neurons whose |Cohen's d| exceeds this (τ)
        layers: MLP layers: 12, 10-20, 4,8,12 or auto (the middle half)
        scale: what strength 1 means, in multiples of s (γ = strength × scale)
        prompt_too: edit the prompt's positions too (default: generated tokens only)
        seed: seed of the pair draw
        batch_size: prompts per forward pass while collecting activations
    """
    layer_ids = parse_layers(layers, lm.arch.num_layers, lm.arch.middle_layers(0.25, 0.75))
    selected: dict[str, dict[str, list[int]]] = {}

    def fit_one(dim: Dimension, level: float) -> list[Intervention]:
        data = contrastive_pairs(dim, pairs, seed=seed)
        sites = [("mlp_hidden", l) for l in layer_ids]
        high, low = capture_pairs(lm, data, sites, batch_size=batch_size, on_progress=on_progress)
        items = []
        counts = {"high": [], "low": []}
        for layer, site in zip(layer_ids, sites):
            s, high_idx, low_idx = select_neurons(high[site], low[site], quantile, min_d)
            counts["high"].append(len(high_idx))
            counts["low"].append(len(low_idx))
            index = torch.cat([high_idx, low_idx]).sort().values
            if len(index):
                items.append(Intervention("mlp_hidden", layer, s[index] * (level * scale), index,
                                          positions="all" if prompt_too else "generated"))
        selected[dim.name] = counts
        return items

    interventions = per_dimension(persona, fit_one)
    options = {"pairs": pairs, "quantile": quantile, "min_d": min_d, "layers": layer_ids, "scale": scale,
               "prompt_too": prompt_too, "seed": seed, "neurons": selected}
    return ActivationEdit(method="dpnle", persona=persona, options=options, base=BaseModelInfo.of(lm),
                          interventions=interventions)
