"""NPTI (neuron-based personality trait induction): per MLP neuron, the share of prompt tokens on
which it fires (activation > 0) under high- vs low-pole inputs; the neurons with the largest
difference in each direction form the two pole sets. At inference the target pole's neurons are
raised to at least their 95th-percentile activation (× strength) and the opposite pole's neurons
are clamped to ≤ 0. A negative level swaps the roles; the strength should stay positive.
"""

from __future__ import annotations

from typing import Callable

import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.methods.capture import capture, capture_pairs
from personaedit.methods.contrast import contrastive_pairs, parse_layers, per_dimension
from personaedit.models import LoadedModel
from personaedit.persona import Dimension, Persona


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    pairs: int = 256,
    top_share: float = 0.005,
    percentile: float = 0.95,
    layers: str = "auto",
    prompt_too: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> ActivationEdit:
    """Firing-frequency personality neurons: raise the target pole's, clamp the opposite pole's.

    Options:
        pairs: contrastive prompt pairs per dimension
        top_share: share of each layer's MLP neurons kept per pole
        percentile: activation percentile the target pole's neurons are raised to
        layers: MLP layers: 12, 10-20, 4,8,12 or auto (the middle half)
        prompt_too: edit the prompt's positions too (default: generated tokens only)
        seed: seed of the pair draw
        batch_size: prompts per forward pass while collecting activations
    """
    layer_ids = parse_layers(layers, lm.arch.num_layers, lm.arch.middle_layers(0.25, 0.75))
    positions = "all" if prompt_too else "generated"

    def fit_one(dim: Dimension, level: float) -> list[Intervention]:
        data = contrastive_pairs(dim, pairs, seed=seed)
        sites = [("mlp_hidden", l) for l in layer_ids]
        kwargs = {"batch_size": batch_size, "on_progress": on_progress}
        fire_high, fire_low = capture_pairs(lm, data, sites, reduce="firing", **kwargs)
        target_acts = capture(lm, data.high if level > 0 else data.low, sites, **kwargs)
        items = []
        for layer, site in zip(layer_ids, sites):
            diff = fire_high[site].mean(0) - fire_low[site].mean(0)
            if level < 0:
                diff = -diff
            k = max(1, round(top_share * diff.numel()))
            target = torch.topk(diff, k).indices.sort().values
            opposite = torch.topk(-diff, k).indices.sort().values
            raise_to = torch.quantile(target_acts[site][:, target], percentile, dim=0) * abs(level)
            items.append(Intervention("mlp_hidden", layer, raise_to, target, op="floor", positions=positions))
            items.append(Intervention("mlp_hidden", layer, torch.zeros(k), opposite, op="ceil", positions=positions))
        return items

    interventions = per_dimension(persona, fit_one)
    options = {"pairs": pairs, "top_share": top_share, "percentile": percentile, "layers": layer_ids,
               "prompt_too": prompt_too, "seed": seed}
    return ActivationEdit(method="npti", persona=persona, options=options, base=BaseModelInfo.of(lm),
                          interventions=interventions)
