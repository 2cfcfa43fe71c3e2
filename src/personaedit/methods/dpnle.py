"""DPN-LE: dual personality neuron localization and editing, as its reference code (Z1ivan/DPN-LE) does it.

1. Contrastive pairs: the same question about the trait under a description of the high pole and of the low
   pole, drawn at random from the training descriptions; persona and question in the user turn, no system
   message (`contrast.as_user_turn`, `prompts="reference"`).
2. MLP hidden activations (the input of `down_proj`) at the last prompt token, per layer in a range.
3. Per layer: s = mean(high) − mean(low); Cohen's d per neuron with the pooled standard deviation.
4. Keep neuron j if |s_j| > quantile_q(|s|) and |d_j| > τ: high-exclusive (d > τ) and low-exclusive
   (d < −τ) neurons, disjoint by construction.
5. While generating, add γ·w·s on the kept neurons (both sets); the sign of the level picks the pole. The
   reference's γ is 1 and w ("weighted" mode) runs from 0.75 to 1 by the rank of the neuron's |d| in its layer.

Where this differs from the reference, and why:
- Layers: the reference edits from a model-specific "separation layer" to the last layer (12–31 of 32 on
  Llama-3-8B, 14–27 of 28 on Qwen2.5-7B). `layers="auto"` scales that to any depth: from 7/16 of the depth
  (the mean of the two) to the last layer. `personaedit calibrate dpnle` chooses the range per model.
- τ = 0.3 (the reference's Qwen2.5-7B value; its Llama-3-8B value 0.8 kept 7 of 23,040 neurons on the
  default model in this project's earlier variant, too few to move anything).
- Pairs: at most `pairs`, and never a repeated (question, description, description) combination; the
  reference draws 1,000 from a larger question set. The training split has 16 questions per trait and 6
  descriptions per pole (576 combinations).
- "Generated positions" include the last prompt token (it predicts the first reply token); the reference
  edits the decoding steps only. `prompt_too` edits every position.
- `prompts="system"` is this project's earlier variant (description as the system message, questions of
  every trait); `weighting="none"` drops w.
"""

from __future__ import annotations

from typing import Callable

import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.errors import PersonaEditError
from personaedit.methods.capture import ActivationOptions, capture_pairs
from personaedit.methods.contrast import cohens_d, contrastive_pairs, parse_layers, per_dimension, \
    pole_descriptions, trait_questions
from personaedit.models import LoadedModel
from personaedit.persona import Dimension, Persona

SEPARATION_DEPTH = 7 / 16  # the reference's separation layers: 12/32 (Llama-3-8B) and 14/28 (Qwen2.5-7B)
WEIGHT_RANGE = (0.75, 1.0)
PROMPT_STYLES = ("reference", "system")
WEIGHTINGS = ("rank", "none")


def select_neurons(high: torch.Tensor, low: torch.Tensor, quantile: float, min_d: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(steering vector s, high-exclusive indices, low-exclusive indices) for one layer."""
    s = high.mean(0) - low.mean(0)
    d = cohens_d(high, low)
    large = s.abs() > torch.quantile(s.abs(), quantile)
    return s, torch.nonzero(large & (d > min_d)).flatten(), torch.nonzero(large & (d < -min_d)).flatten()


def rank_weights(d: torch.Tensor, low: float = WEIGHT_RANGE[0], high: float = WEIGHT_RANGE[1]) -> torch.Tensor:
    """Weights from `low` (smallest |d|) to `high` (largest |d|), linear in the rank; one neuron gets `high`."""
    if d.numel() <= 1:
        return torch.full_like(d, high, dtype=torch.float32)
    ranks = d.abs().argsort().argsort().float()
    return low + (high - low) * ranks / (d.numel() - 1)


def default_layers(num_layers: int) -> list[int]:
    """From the separation layer (7/16 of the depth) to the last layer."""
    return list(range(min(num_layers - 1, round(num_layers * SEPARATION_DEPTH)), num_layers))


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    pairs: int = 1000,
    quantile: float = 0.995,
    min_d: float = 0.3,
    layers: str = "auto",
    scale: float = 1.0,
    weighting: str = "rank",
    prompts: str = "reference",
    activation: ActivationOptions = ActivationOptions(),
    on_progress: Callable[[int, int], None] | None = None,
) -> ActivationEdit:
    """Dual personality neurons (|s| quantile and |Cohen's d| filter), sparse additive edit.

    Options:
        pairs: contrastive prompt pairs per dimension, at most (the reference: 1,000)
        quantile: keep neurons whose |s| exceeds this quantile of the layer's |s|
        min_d: keep neurons whose |Cohen's d| exceeds this (τ)
        layers: MLP layers: 12, 10-20, 4,8,12 or auto (from 7/16 of the depth to the last layer)
        scale: γ, what strength 1 means, in multiples of s (the reference: 1)
        weighting: rank (w from 0.75 to 1 by |d| rank, the reference's weighted mode) or none
        prompts: reference (persona and trait question in the user turn) or system (persona as system message)

    With the options activation methods share (ActivationOptions).
    """
    if prompts not in PROMPT_STYLES:
        raise PersonaEditError(f"unknown prompts {prompts!r} (valid: {', '.join(PROMPT_STYLES)})")
    if weighting not in WEIGHTINGS:
        raise PersonaEditError(f"unknown weighting {weighting!r} (valid: {', '.join(WEIGHTINGS)})")
    layer_ids = parse_layers(layers, lm.arch.num_layers, default_layers(lm.arch.num_layers))
    selected: dict[str, dict[str, list[int]]] = {}

    def fit_one(dim: Dimension, level: float) -> list[Intervention]:
        if prompts == "reference":
            questions = trait_questions(dim)
            highs, lows = pole_descriptions(dim)
            data = contrastive_pairs(dim, min(pairs, len(questions) * len(highs) * len(lows)), seed=activation.seed,
                                     questions=questions, user_turn=True)
        else:
            data = contrastive_pairs(dim, pairs, seed=activation.seed)
        # Every layer is captured (one forward pass costs the same), so other layer ranges reuse the cache.
        every = [("mlp_hidden", l) for l in range(lm.arch.num_layers)]
        high, low = capture_pairs(lm, data, every, batch_size=activation.batch_size, on_progress=on_progress)
        sites = [("mlp_hidden", l) for l in layer_ids]
        items = []
        counts: dict[str, list[int]] = {"high": [], "low": []}
        for layer, site in zip(layer_ids, sites):
            s, high_idx, low_idx = select_neurons(high[site], low[site], quantile, min_d)
            counts["high"].append(len(high_idx))
            counts["low"].append(len(low_idx))
            index = torch.cat([high_idx, low_idx]).sort().values
            if len(index):
                weight = rank_weights(cohens_d(high[site], low[site])[index]) if weighting == "rank" else 1.0
                items.append(Intervention("mlp_hidden", layer, s[index] * weight * (level * scale), index,
                                          positions=activation.positions))
        selected[dim.name] = counts
        return items

    interventions = per_dimension(persona, fit_one)
    options = {"pairs": pairs, "quantile": quantile, "min_d": min_d, "layers": layer_ids, "scale": scale,
               "weighting": weighting, "prompts": prompts, "neurons": selected}
    return ActivationEdit(method="dpnle", persona=persona, options=options, base=BaseModelInfo.of(lm),
                          interventions=interventions)
