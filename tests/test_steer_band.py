"""Steering on a band of layers: each layer's own mean difference, the strength shared evenly among them."""

import torch

from personaedit.edits import load_edit
from personaedit.methods import fit_edit
from personaedit.methods.capture import capture
from personaedit.methods.contrast import contrastive_pairs
from personaedit.persona import BIG_FIVE

FAST = {"pairs": 12, "batch_size": 8}


def test_a_band_steers_every_layer_with_its_own_difference_and_a_share_of_the_strength(lm, tmp_path):
    edit = fit_edit("steer", lm, "extraversion=high", layer="0-2", scale=6.0, **FAST)
    pairs = contrastive_pairs(BIG_FIVE["extraversion"], 12)
    sites = [("residual", layer) for layer in range(3)]
    high, low = capture(lm, pairs.high, sites), capture(lm, pairs.low, sites)
    assert [item.layer for item in edit.interventions] == [0, 1, 2]
    for item, site in zip(edit.interventions, sites):
        torch.testing.assert_close(item.values, (high[site].mean(0) - low[site].mean(0)) * 6.0 / 3)
    assert edit.options["fitted"]["extraversion"] == {"layers": [0, 1, 2]}
    assert [i.layer for i in load_edit(edit.save(tmp_path / "band")).interventions] == [0, 1, 2]


def test_one_layer_or_auto_still_steers_a_single_layer(lm):
    one = fit_edit("steer", lm, "extraversion=high", layer="1", **FAST)
    auto = fit_edit("steer", lm, "extraversion=high", **FAST)
    assert [i.layer for i in one.interventions] == [1] and len(auto.interventions) == 1
    assert one.options["fitted"]["extraversion"]["layer"] == 1


def test_equal_norms_keep_each_layers_direction_at_the_bands_mean_norm(lm):
    plain = fit_edit("steer", lm, "extraversion=high", layer="0-2", scale=3.0, **FAST)
    equal = fit_edit("steer", lm, "extraversion=high", layer="0-2", scale=3.0, equal_norms=True, **FAST)
    norms = torch.stack([item.values.norm() for item in plain.interventions])
    for before, after in zip(plain.interventions, equal.interventions):
        assert torch.isclose(after.values.norm(), norms.mean(), rtol=1e-4)
        torch.testing.assert_close(after.values / after.values.norm(), before.values / before.values.norm())
    assert not torch.allclose(norms, norms.mean())  # the differences' norms did differ
