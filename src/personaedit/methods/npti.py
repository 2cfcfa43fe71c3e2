"""NPTI (neuron-based personality trait induction), as its reference code (RUCAIBox/NPTI) does it.

1. The model answers questions in persona: no system message; a user turn with a description of one pole
   (drawn at random per question from the training descriptions) and a question about the trait
   (`contrast.as_user_turn`); greedy, repetition penalty 1.1. Both poles answer the same questions.
2. On the reply tokens only, each MLP neuron's gate activation after its activation function (site
   `mlp_gate`: SiLU(gate) in Llama-like models, before the product with `up`): per pole its firing rate (the
   share of reply tokens where it is > 0) and the 95th percentile of its activation.
3. Neurons are ranked across all layers at once by firing-rate difference, target pole minus opposite
   pole. The top `min_share` of all MLP neurons are kept (the reference keeps 2,000 of Llama-3-8B's 458,752,
   0.44%), then more while the difference stays ≥ `min_diff`. The opposite pole's neurons are chosen the
   same way with the difference reversed.
4. While generating, the target pole's neurons get p95 · strength · sigmoid(10·(diff − 0.15)) *added* to
   their activation (the reference's `val`, swept 0.6–1.5, is the strength); the opposite pole's neurons are
   clamped to ≤ 0. A negative level makes the low pole the target.

Where this differs from the reference, and why:
- Replies are `max_new_tokens` long (default 96; the reference allows 500) to `questions` training
  questions (default 64): generation dominates the cost on a CPU. Both are options.
- Every selected neuron is raised at every step; the reference raises a random 90% of them per step. A saved
  edit then gives the same reply every time; strength 0.9 matches the reference's expected addition.
- p95 is the exact percentile of the recorded activations; the reference reads it off a histogram of
  0.01-wide bins on [0, 3] (so it never exceeds 2.99).
- The statistics come from one teacher-forced pass over prompt + reply (`capture.over_replies`: the same
  activations the decoding steps computed) rather than from hooks inside the decoding loop.
- "Generated positions" include the last prompt token (it predicts the first reply token); the reference
  edits the decoding steps only. `prompt_too` edits every position.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable

import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.errors import PersonaEditError
from personaedit.fileio import write_json_atomic
from personaedit.methods.capture import ActivationOptions, over_replies
from personaedit.methods.contrast import ContrastivePairs, as_user_turn, parse_layers, per_dimension, \
    pole_descriptions, trait_questions
from personaedit.models import LoadedModel, generate
from personaedit.models.generation import TRANSCRIPT_TURN
from personaedit.models.loading import cache_dir
from personaedit.persona import Dimension, Persona

REPETITION_PENALTY = 1.1  # the reference's, while the persona answers
REFERENCE_SHARE = 2000 / (32 * 14336)  # 2,000 of Llama-3-8B's MLP neurons


def answering_prompts(dim: Dimension, questions: list[str], seed: int) -> ContrastivePairs:
    """Each question once per pole, under a description of that pole drawn at random (seeded)."""
    highs, lows = pole_descriptions(dim)
    rng = random.Random(seed)
    return ContrastivePairs(dim.name, high=[as_user_turn(rng.choice(highs), q) for q in questions],
                            low=[as_user_turn(rng.choice(lows), q) for q in questions])


def persona_replies(lm: LoadedModel, prompts: list[tuple[str | None, str]], max_new_tokens: int,
                    batch_size: int, on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy replies to user-turn prompts, cached per (model, prompts, length): the costly part of a fit."""
    key_parts = [lm.fingerprint, prompts, max_new_tokens, REPETITION_PENALTY]
    if not getattr(lm.tokenizer, "chat_template", None):  # replies now end at the transcript's next user turn
        key_parts.append(TRANSCRIPT_TURN)
    key = hashlib.sha256(json.dumps(key_parts).encode())
    path = cache_dir() / "replies" / f"{key.hexdigest()[:24]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    replies = generate(lm, [user for _, user in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
                       repetition_penalty=REPETITION_PENALTY, on_batch=on_progress)
    write_json_atomic(path, replies)
    return replies


@dataclass
class FiringStats:
    """Per layer: how many reply tokens each neuron fired on (activation > 0), out of `tokens`."""

    fired: dict[int, torch.Tensor]
    tokens: int = 0

    def rates(self, layers: list[int]) -> torch.Tensor:
        """[layers, neurons] firing rates."""
        return torch.stack([self.fired[l] for l in layers]) / max(self.tokens, 1)


def firing_stats(lm: LoadedModel, prompts, replies, layers: list[int], batch_size: int,
                 on_progress: Callable[[int, int], None] | None = None) -> FiringStats:
    stats = FiringStats({l: torch.zeros(lm.arch.mlp_size) for l in layers})

    def count(site, acts: torch.Tensor) -> None:
        stats.fired[site[1]] += (acts > 0).sum(0).float()

    stats.tokens = over_replies(lm, prompts, replies, [("mlp_gate", l) for l in layers], count,
                                batch_size=batch_size, on_progress=on_progress)
    if stats.tokens == 0:
        raise PersonaEditError("npti: the model wrote no reply tokens while answering in persona (every reply ended "
                               "at once); it has nothing to count neurons on")
    return stats


def select_neurons(rate_target: torch.Tensor, rate_opposite: torch.Tensor, min_count: int,
                   min_diff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer positions, neuron indices, differences) of the target pole's neurons, ranked over all layers at
    once by firing-rate difference: the top `min_count`, then every further one with difference ≥ `min_diff`."""
    diff = (rate_target - rate_opposite).flatten()
    ranked = torch.sort(diff, descending=True, stable=True)
    count = max(min_count, int((ranked.values >= min_diff).sum()))
    chosen = ranked.indices[:count]
    width = rate_target.shape[1]
    return chosen // width, chosen % width, ranked.values[:count]


def percentile_at(lm: LoadedModel, prompts, replies, chosen: dict[int, torch.Tensor], q: float, batch_size: int,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """The q-quantile of each chosen neuron's activation over the reply tokens, per layer."""
    seen: dict[int, list[torch.Tensor]] = {l: [] for l in chosen}

    def keep(site, acts: torch.Tensor) -> None:
        seen[site[1]].append(acts[:, chosen[site[1]]])

    over_replies(lm, prompts, replies, [("mlp_gate", l) for l in chosen], keep, batch_size=batch_size,
                 on_progress=on_progress)
    return {l: torch.quantile(torch.cat(parts), q, dim=0) for l, parts in seen.items()}


def activation_weight(diff: torch.Tensor) -> torch.Tensor:
    """The reference's weight of a neuron by its firing-rate difference: sigmoid(10·(diff − 0.15))."""
    return torch.sigmoid(10 * (diff - 0.15))


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    questions: int = 64,
    max_new_tokens: int = 96,
    min_share: float = REFERENCE_SHARE,
    min_diff: float = 0.1,
    percentile: float = 0.95,
    layers: str = "all",
    activation: ActivationOptions = ActivationOptions(),
    on_progress: Callable[[int, int], None] | None = None,
) -> ActivationEdit:
    """Firing-rate personality neurons on the replies the model writes in persona: add to the target pole's.

    Options:
        questions: training questions each pole's persona answers (the trait's own first)
        max_new_tokens: length of those replies (the reference: up to 500)
        min_share: share of all MLP neurons kept at least, ranked over every layer (reference: 0.44%)
        min_diff: keep further neurons while the firing-rate difference is at least this (reference: 0.1)
        percentile: activation percentile that sets how much a neuron is raised (reference: 0.95)
        layers: MLP layers to search: all, 12, 10-20 or 4,8,12 (reference: all)

    With the options activation methods share (ActivationOptions).
    """
    every = list(range(lm.arch.num_layers))
    layer_ids = every if layers in ("all", "auto") else parse_layers(layers, lm.arch.num_layers, every)
    positions = activation.positions
    total = len(layer_ids) * lm.arch.mlp_size
    min_count = max(1, round(min_share * total))
    chosen_counts: dict[str, dict[str, int]] = {}

    def fit_one(dim: Dimension, level: float) -> list[Intervention]:
        asked = answering_prompts(dim, trait_questions(dim, questions), activation.seed)
        replies = {pole: persona_replies(lm, prompts, max_new_tokens, activation.batch_size, on_progress)
                   for pole, prompts in (("high", asked.high), ("low", asked.low))}
        rates = {pole: firing_stats(lm, getattr(asked, pole), replies[pole], layer_ids,
                                    activation.batch_size).rates(layer_ids)
                 for pole in ("high", "low")}
        target, opposite = ("high", "low") if level > 0 else ("low", "high")
        rows, cols, diffs = select_neurons(rates[target], rates[opposite], min_count, min_diff)
        off_rows, off_cols, _ = select_neurons(rates[opposite], rates[target], min_count, min_diff)
        by_layer = {layer_ids[int(r)]: cols[rows == r] for r in rows.unique()}
        p95 = percentile_at(lm, getattr(asked, target), replies[target], by_layer, percentile, activation.batch_size)
        items = []
        for position in rows.unique().tolist():
            layer, keep = layer_ids[position], rows == position
            amount = p95[layer] * activation_weight(diffs[keep]) * abs(level)
            items.append(Intervention("mlp_gate", layer, amount, cols[keep], op="add", positions=positions))
        for position in off_rows.unique().tolist():
            off = off_cols[off_rows == position]
            items.append(Intervention("mlp_gate", layer_ids[position], torch.zeros(len(off)), off, op="ceil",
                                      positions=positions))
        chosen_counts[dim.name] = {"raised": len(cols), "clamped": len(off_cols), "of": total}
        return items

    interventions = per_dimension(persona, fit_one)
    options = {"questions": questions, "max_new_tokens": max_new_tokens, "min_share": min_share,
               "min_diff": min_diff, "percentile": percentile, "layers": layer_ids, "neurons": chosen_counts}
    return ActivationEdit(method="npti", persona=persona, options=options, base=BaseModelInfo.of(lm),
                          interventions=interventions)
