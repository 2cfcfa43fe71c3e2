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
