"""PALETTE on a gemma3 layout whose `down_proj` inputs share a large mean, as Gemma-3-270M's do (its layer-10
keys keep 32% of their second moment in their mean): with v = k* (C = I) the rank-one update writes a share
of δ into every token, with `covariance` (v = C⁻¹k*) it stays on the queries' keys."""

import torch

from personaedit.data import records
from personaedit.methods import fit_edit
from personaedit.methods.rank_one import rank_one
from personaedit.methods.second_moment import regularised_inverse
from personaedit.models.forward import left_pad, position_ids
from personaedit.models.hooks import hooked
from personaedit.persona import Persona
from tiny import tiny_lm

LAYER = 1
TINY = dict(layer=LAYER, queries=2, steps=40, lr=0.05, kl_factor=0.0, clamp=1e4, prefixes=2, prefix_length=5)


def shared_mean_gemma():
    """A tiny gemma3 model whose layer-1 keys act(gate)·up are mostly positive (up = gate): a large common mean."""
    lm = tiny_lm("gemma3_text")
    mlp = lm.arch.mlp(LAYER)
    with torch.no_grad():
        mlp.up_proj.weight.copy_(mlp.gate_proj.weight)
    return lm


def neutral_keys(lm) -> tuple[torch.Tensor, torch.Tensor]:
    """`down_proj` inputs at LAYER and its outputs for every token of the neutral test texts: [tokens, width]."""
    texts = [r["text"] for r in records("neutral_text", "test")]
    batch = left_pad(lm, [list(ids)[:48] for ids in lm.tokenizer(texts)["input_ids"]])
    seen = {}
    with hooked(lm.arch, [("mlp_hidden", LAYER, lambda h: seen.__setitem__("k", h.detach()))]), torch.no_grad():
        lm.model(**batch, position_ids=position_ids(batch["attention_mask"]))
    keys = seen["k"][batch["attention_mask"].bool()]
    return keys, keys @ lm.arch.mlp_out_weight(LAYER).detach().T


def collateral(lm, edit) -> float:
    """Median over neutral tokens of ‖ΔW k‖ / ‖W k‖ (how much the edit moves unrelated tokens' MLP outputs)."""
    keys, outputs = neutral_keys(lm)
    delta = edit.deltas[lm.arch.mlp_out_param(LAYER)]
    change = (keys @ delta.v) @ delta.u.T
    return float((change.norm(dim=1) / outputs.norm(dim=1)).median())


def test_the_tiny_gemma_keys_share_a_large_mean_like_gemma_3_270m():
    keys, _ = neutral_keys(shared_mean_gemma())
    mean = keys.mean(0)
    assert float(mean.norm() ** 2 / keys.pow(2).sum(1).mean()) > 0.3


def test_palette_with_covariance_keeps_the_update_off_unrelated_tokens():
    lm = shared_mean_gemma()
    persona = Persona.parse("extraversion=high")
    plain = fit_edit("palette", lm, persona, **TINY)
    whitened = fit_edit("palette", lm, persona, covariance=True, samples=400, **TINY)
    assert whitened.options["samples"] == 400 and plain.options["samples"] is None
    # Measured: 2.37 plain, 1.00 whitened (2.95 when the second query's v was C⁻¹k* projected off the first key).
    assert collateral(lm, whitened) < 0.6 * collateral(lm, plain)


def test_a_protected_whitened_update_has_the_least_response_on_the_statistics_keys():
    torch.manual_seed(0)
    corpus = torch.randn(500, 16, dtype=torch.float64) + 2.0  # keys with a large shared mean
    moment = corpus.T @ corpus / len(corpus)
    key = corpus[0] + torch.randn(16, dtype=torch.float64)
    earlier = key[:, None] + torch.randn(16, 2, dtype=torch.float64)  # PALETTE's keys at "I" are close to parallel
    delta = torch.randn(8)
    u, v = rank_one(key.float(), delta, regularised_inverse(moment), earlier.float())
    assert torch.allclose(torch.outer(u, v) @ key.float(), delta, atol=1e-4)
    assert torch.allclose(v.double() @ earlier, torch.zeros(2, dtype=torch.float64), atol=1e-5 * float(v.norm()))
    # Projecting C⁻¹k* off the earlier keys also meets both constraints, at a larger mean squared response.
    basis, _ = torch.linalg.qr(earlier)
    projected = regularised_inverse(moment) @ key
    projected = projected - basis @ (basis.T @ projected)

    def response(w):
        w = w.double() / float(w.double() @ key)  # scaled to vᵀk* = 1
        return float(w @ moment @ w)

    assert response(v) < 0.1 * response(projected)
