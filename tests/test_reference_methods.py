"""NPTI and DPN-LE against small independent computations of their reference code's rules, on tiny models."""

import random

import pytest
import torch
import torch.nn.functional as F

from personaedit.data import records
from personaedit.methods import fit_edit
from personaedit.methods import npti
from personaedit.methods.capture import over_replies
from personaedit.methods.contrast import PERSONA_TEMPLATE, contrastive_pairs, trait_questions
from personaedit.methods.dpnle import default_layers, rank_weights
from personaedit.models.forward import encode_prompts
from personaedit.models.generation import build_messages, render_chat
from personaedit.models.hooks import hooked
from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.persona import BIG_FIVE, MBTI
from tiny import tiny_lm

NPTI_FAST = {"questions": 4, "max_new_tokens": 6, "batch_size": 4}


def test_the_gate_site_is_the_activation_of_the_gate_before_the_product_with_up(lm):
    ids = torch.randint(3, 300, (2, 5))
    seen, gate = {}, {}
    handle = lm.arch.mlp(1).gate_proj.register_forward_hook(lambda _m, _a, out: gate.update(out=out))
    try:
        with hooked(lm.arch, [("mlp_gate", 1, lambda h: seen.update(h=h))]), torch.no_grad():
            lm.model(ids)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["h"], F.silu(gate["out"]))
    assert lm.arch.site_width("mlp_gate") == lm.arch.mlp_size


def test_reply_activations_equal_those_of_the_decoding_steps(lm):
    """Teacher forcing over prompt + reply gives, at each reply token, what a step-by-step cached decode of the
    same tokens computes (the reference records at decoding steps)."""
    prompts = [(None, "Tell me about a party."), ("You are calm.", "What do you do on a rainy day?")]
    replies = ["I like it a lot", "stay in and read"]
    taught: list[torch.Tensor] = []
    over_replies(lm, prompts, replies, [("mlp_gate", 2)], lambda _site, acts: taught.append(acts))
    decoded = []
    for (system, user), reply in zip(prompts, replies):
        text, templated = render_chat(lm.tokenizer, build_messages(lm, user, system))
        batch = encode_prompts(lm, [text], add_special_tokens=not templated)
        reply_ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"]
        steps = []
        with hooked(lm.arch, [("mlp_gate", 2, lambda h: steps.append(h[0, -1].clone()))]), torch.no_grad():
            out = lm.model(**batch, use_cache=True)
            steps.clear()  # the prompt pass; each reply token is then one decoding step
            cache, mask = cache_of(out), batch["attention_mask"]
            for token in reply_ids:
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                cache = cache_of(lm.model(input_ids=torch.tensor([[token]]), attention_mask=mask, use_cache=True,
                                          **{cache_argument(lm.model): cache}))
        decoded.append(torch.stack(steps))
    torch.testing.assert_close(torch.cat(taught), torch.cat(decoded), atol=1e-5, rtol=1e-4)


def _reference_selection(rate_target, rate_opposite, min_required, min_diff=0.1):
    """The reference's procedure as written: sort every (layer, neuron) by difference, walk the list, keep the first
    `min_required`, then keep going while the difference is ≥ min_diff."""
    rows = []
    flat = [(float(rate_target[l, j] - rate_opposite[l, j]), l, j)
            for l in range(rate_target.shape[0]) for j in range(rate_target.shape[1])]
    flat.sort(key=lambda t: -t[0])
    kept = 0
    for idx, (diff, layer, col) in enumerate(flat):
        if idx < min_required or diff >= min_diff:
            rows.append((layer, col))
            kept += 1
        if kept >= min_required and diff < min_diff:
            break
    return sorted(rows)


@pytest.mark.parametrize("min_count", [1, 5, 40])
def test_npti_selection_ranks_over_all_layers_like_the_reference(min_count):
    generator = torch.Generator().manual_seed(min_count)
    target, opposite = torch.rand(4, 16, generator=generator), torch.rand(4, 16, generator=generator)
    rows, cols, diffs = npti.select_neurons(target, opposite, min_count, 0.1)
    assert sorted(zip(rows.tolist(), cols.tolist())) == _reference_selection(target, opposite, min_count)
    torch.testing.assert_close(diffs, (target - opposite)[rows, cols])


def test_npti_edit_adds_the_weighted_percentile_and_clamps_the_opposite_pole(lm):
    edit = fit_edit("npti", lm, "extraversion=high", layers="all", min_share=0.02, **NPTI_FAST)
    raised = [i for i in edit.interventions if i.op == "add"]
    clamped = [i for i in edit.interventions if i.op == "ceil"]
    assert raised and clamped and all(i.point == "mlp_gate" for i in edit.interventions)
    assert all(torch.all(i.values == 0) for i in clamped)
    # Recompute from the statistics, independently of the edit: rates on both poles' replies, the selection,
    # p95 of the target pole's activations, and the reference's sigmoid weight.
    dim = BIG_FIVE["extraversion"]
    asked = npti.answering_prompts(dim, trait_questions(dim, 4), 0)
    layers = list(range(lm.arch.num_layers))
    replies = {p: npti.persona_replies(lm, getattr(asked, p), 6, 4) for p in ("high", "low")}
    acts = {}
    for pole in ("high", "low"):
        per_layer = {l: [] for l in layers}
        over_replies(lm, getattr(asked, pole), replies[pole], [("mlp_gate", l) for l in layers],
                     lambda site, a: per_layer[site[1]].append(a))
        acts[pole] = {l: torch.cat(v) for l, v in per_layer.items()}
    rate = {p: torch.stack([(acts[p][l] > 0).float().mean(0) for l in layers]) for p in acts}
    min_count = max(1, round(0.02 * len(layers) * lm.arch.mlp_size))
    expected = _reference_selection(rate["high"], rate["low"], min_count)
    got = sorted((i.layer, int(j)) for i in raised for j in i.indices)
    assert got == expected
    for item in raised:
        for j, value in zip(item.indices.tolist(), item.values.tolist()):
            p95 = torch.quantile(acts["high"][item.layer][:, j], 0.95)
            diff = rate["high"][item.layer, j] - rate["low"][item.layer, j]
            assert value == pytest.approx(float(p95 / (1 + torch.exp(-10 * (diff - 0.15)))), rel=1e-4, abs=1e-6)
    assert sorted((i.layer, int(j)) for i in clamped for j in i.indices) == \
        _reference_selection(rate["low"], rate["high"], min_count)


def test_npti_low_pole_swaps_the_roles(lm):
    high = fit_edit("npti", lm, "extraversion=high", min_share=0.02, **NPTI_FAST)
    low = fit_edit("npti", lm, "extraversion=low", min_share=0.02, **NPTI_FAST)
    key = lambda edit, op: sorted((i.layer, int(j)) for i in edit.interventions if i.op == op for j in i.indices)
    assert key(high, "add") == key(low, "ceil") and key(high, "ceil") == key(low, "add")


def test_npti_reuses_cached_replies(lm, monkeypatch):
    fit_edit("npti", lm, "openness=high", **NPTI_FAST)

    def no_generation(*_a, **_k):
        raise AssertionError("replies should come from the cache")

    monkeypatch.setattr(npti, "generate", no_generation)
    fit_edit("npti", lm, "openness=low", **NPTI_FAST)


def test_reference_prompts_put_persona_and_a_trait_question_in_the_user_turn():
    dim = BIG_FIVE["neuroticism"]
    own = {r["question"] for r in records("situational_questions", "train", trait="neuroticism")}
    assert set(trait_questions(dim)) == own
    assert trait_questions(dim, len(own) + 5)[: len(own)] == trait_questions(dim)
    assert len(trait_questions(MBTI["tf"])) > len(own)  # an MBTI axis has no questions of its own
    pairs = contrastive_pairs(dim, 30, questions=trait_questions(dim), user_turn=True)
    for (system, user), (system_low, user_low) in zip(pairs.high, pairs.low):
        assert system is None and system_low is None
        question = user.rsplit("###Question: ", 1)[1].removesuffix("\n\n###Response:")
        assert question in own and user_low.endswith(question + "\n\n###Response:")
        assert user.startswith(PERSONA_TEMPLATE.split("{description}")[0])


def test_dpnle_rank_weights_run_from_three_quarters_to_one_by_abs_d():
    d = torch.tensor([0.5, -2.0, 1.0, -0.7])
    weights = rank_weights(d)
    order = d.abs().argsort()
    torch.testing.assert_close(weights[order], torch.tensor([0.75, 0.75 + 0.25 / 3, 0.75 + 0.5 / 3, 1.0]))
    assert rank_weights(torch.tensor([3.0])).tolist() == [1.0]


def test_dpnle_reference_defaults_scale_the_separation_layer_to_the_depth():
    assert default_layers(32)[0] == 14 and default_layers(32)[-1] == 31  # the reference: 12 and 14 of 32 and 28
    assert default_layers(28)[0] == 12 and default_layers(3) == [1, 2]


def test_dpnle_edit_is_gamma_times_rank_weight_times_s_on_the_selected_neurons(lm):
    from personaedit.methods.capture import capture_pairs
    from personaedit.methods.contrast import cohens_d

    edit = fit_edit("dpnle", lm, "extraversion=low", layers="1-2", quantile=0.8, min_d=0.1, pairs=40, scale=2.0)
    dim = BIG_FIVE["extraversion"]
    data = contrastive_pairs(dim, 40, questions=trait_questions(dim), user_turn=True)
    high, low = capture_pairs(lm, data, [("mlp_hidden", 1), ("mlp_hidden", 2)])
    for item in edit.interventions:
        h, l = high[("mlp_hidden", item.layer)], low[("mlp_hidden", item.layer)]
        s = h.mean(0) - l.mean(0)
        d = (h.mean(0) - l.mean(0)) / torch.sqrt(((h.var(0) * (len(h) - 1) + l.var(0) * (len(l) - 1))
                                                   / (len(h) + len(l) - 2)) + 1e-6)
        keep = (s.abs() > torch.quantile(s.abs(), 0.8)) & (d.abs() > 0.1)
        assert item.indices.tolist() == torch.nonzero(keep).flatten().tolist()
        ranks = d[keep].abs().argsort().argsort().float()
        weights = 0.75 + 0.25 * ranks / max(int(keep.sum()) - 1, 1)
        torch.testing.assert_close(item.values, -2.0 * weights * s[keep])
        torch.testing.assert_close(cohens_d(h, l), d)
