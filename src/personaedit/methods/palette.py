"""PALETTE: personality editing through adjustment queries. For each pole the persona asks for, the
package's self-referential queries ("[Question] ... [Your answer] {} usually feel more persuaded by" →
" facts", subject I/me/my) are applied one after another with r-ROME at one MLP layer, each on the model
as the earlier ones left it; the edit keeps one rank-one factor pair per query.

Defaults follow the paper (25 steps, lr 0.4, weight decay 1e-4, KL factor 0.0625, 12 queries, loss at
the last layer); keys and values are read over the bare query and 5 model-written prefixes (ROME
generates 10; 5 halve the cost of every step). The layer defaults to 15/28 of the depth (the paper's layer 15 of Qwen2.5-1.5B's 28):
layer 16 of SmolLM2-135M's 30, 6 of GPT-2's 12, 15 of Qwen2.5-1.5B's 28, 17 of Llama-3-8B's 32.
A level below 1 in size scales that dimension's updates; a negative level uses the opposite pole's queries.

Plain sequential r-ROME lets later queries overwrite earlier ones: every query's key is the down_proj
input at "I", so the keys are close to parallel and each rank-one update moves the earlier keys' outputs
too. `protect` (on by default; `--no-protect` gives the paper's plain procedure) makes each update orthogonal
to the earlier queries' keys (ΔW k_j = 0 for j < i), so every edit keeps what the earlier ones did to
their keys. On the default model (tf=T, 12 queries) it raised efficacy from 8/12 to 12/12 with the same
perplexity rise (+2.8% vs +2.5%); see docs/BENCHMARKS.md.

Like r-ROME, PALETTE's update is v = k* (C = I): every token's `down_proj` input k gets the written δ in
proportion to kᵀk*/‖k*‖². That is small where keys point in many directions (SmolLM2-135M: median cos(k, k*)
over neutral text 0.05) but not where they share a large mean: Gemma-3-270M's layer-10 keys keep 32% of their
second moment in their mean, the subject key is at cos 0.51 to it (median cos(k, k*) 0.30), and every neutral
token gets a third of δ, which there sits at its clamp (4‖v₀‖; the post-feedforward norm divides out the MLP
output's scale, so only a δ that outweighs v₀ turns it). One such update moves the layer's residual stream by
a median 17-21% at every token (25% at the subject), against 3-5% (48%) on SmolLM2-135M. `covariance`
(ROME's original C⁻¹k*, as `rome --covariance`) whitens the shared direction away: on Gemma-3-270M one
update then moves other tokens by a median 1-1.4% (the subject still 25%); a single r-ROME request's
unrelated-text perplexity goes from x6.74 to x1.00, and the full PALETTE edit's (extraversion=high, 12
queries, strength 1) from x538 to x3.0 on 24 test questions (benchmarks/effect_table.py --model
gemma-3-270m --methods palette --personas extraversion=high --neutral 4 --set 'palette={"covariance": true}').
What is left is the stack: 12 whitened updates, 8 of their δ at the clamp, still move the residual stream at
most tokens by 11-29% (protect on or off), and strength 0.5 costs x2.4. A tighter clamp (`--clamp 2`) with the
whitened update keeps Gemma-3-270M's text within the calibration budget at strength 0.25, so `calibrate palette`
tries it on models whose MLP output is normalised (docs/BENCHMARKS.md, Gemma-3-270M).
"""

from __future__ import annotations

import contextlib

import torch

from personaedit.data import records
from personaedit.edits import BaseModelInfo, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.methods.locate import Request, check_layer, random_prefixes
from personaedit.methods.rank_one import as_delta, edit_request
from personaedit.methods.second_moment import inverse_second_moment
from personaedit.methods.value import ValueOptions
from personaedit.models import LoadedModel
from personaedit.persona import Persona
from personaedit.progress import Progress

MAX_QUERIES = 16


def persona_requests(persona: Persona, queries: int) -> list[tuple[Request, float, str]]:
    """(request, |level|, query id) for the first `queries` adjustment queries of each targeted pole."""
    if not 1 <= queries <= MAX_QUERIES:
        raise PersonaEditError(f"queries must be between 1 and {MAX_QUERIES} (the package has {MAX_QUERIES} per pole)")
    chosen: list[tuple[Request, float, str]] = []
    for dim, (_, level) in zip(persona.dimensions(), persona.levels):
        if level == 0:
            continue
        rows = records("palette_queries", dimension=dim.name, pole=dim.pole(level).name)[:queries]
        chosen += [(Request.of(r["template"], r["subject"], r["target"]), abs(level), r["id"]) for r in rows]
    if not chosen:
        raise PersonaEditError("the persona sets every level to 0: nothing to edit")
    return chosen


def fit(
    lm: LoadedModel,
    persona: Persona,
    *,
    queries: int = 12,
    layer: int | None = None,
    protect: bool = True,
    covariance: bool = False,
    samples: int = 20000,
    value: ValueOptions = ValueOptions(),
    on_progress: Progress | None = None,
) -> WeightEdit:
    """Sequential r-ROME edits from self-referential adjustment queries (PALETTE).

    Options:
        queries: adjustment queries per targeted pole, 1-16 (the paper's ablation: 4, 8, 12, 16)
        layer: the MLP layer to edit (default: derived from the model's depth)
        protect: make each update leave the earlier queries' keys unchanged (off: the paper's plain sequence)
        covariance: scale each update by the inverse second moment of down_proj inputs (classic ROME; keeps
            the edit off unrelated tokens where keys share a large mean, as on Gemma-3-270M)
        samples: tokens of neutral text the second moment is estimated from (with --covariance)

    With the value optimisation's options (ValueOptions).
    """
    requests = persona_requests(persona, queries)
    chosen = check_layer(lm, layer)
    inverse = inverse_second_moment(lm, chosen, samples) if covariance else None
    prefixes = random_prefixes(lm, value.prefixes, value.prefix_length, value.seed)
    param = lm.arch.mlp_out_param(chosen)
    us, vs, keys, fitted = [], [], [], {}

    def so_far() -> WeightEdit:
        return WeightEdit(method="palette", deltas={param: as_delta(lm, chosen, torch.stack(us, 1), torch.stack(vs, 1))})

    for done, (request, magnitude, query_id) in enumerate(requests):
        protected = torch.stack(keys, 1) if protect and keys else None
        with so_far().apply(lm) if us else contextlib.nullcontext():
            update = edit_request(lm, request, chosen, prefixes, value, inverse_moment=inverse,
                                  protected=protected)
        us.append(update.u * magnitude)
        vs.append(update.v)
        keys.append(update.key)
        fitted[query_id] = update.info
        if on_progress:
            on_progress(done + 1, len(requests))
    # What the fit resolved; fit_edit records every option beside it.
    recorded = {"layer": chosen, "samples": samples if covariance else None, "fitted": fitted}
    return WeightEdit(method="palette", persona=persona, options=recorded, base=BaseModelInfo.of(lm),
                      deltas={param: as_delta(lm, chosen, torch.stack(us, 1), torch.stack(vs, 1))})
