"""PALETTE on the default model: two adjustment queries become the model's greedy continuations."""

import pytest

from personaedit.data import records
from personaedit.methods import fit_edit
from personaedit.methods.locate import Request, efficacy
from personaedit.models import load_model

pytestmark = pytest.mark.integration


def test_palette_edits_two_queries_of_the_default_model():
    lm = load_model("default")
    rows = records("palette_queries", dimension="tf", pole="T")[:2]
    queries = [Request.of(r["template"], r["subject"], r["target"]) for r in rows]
    edit = fit_edit("palette", lm, "tf=T", queries=2, prefixes=5)
    assert edit.deltas[lm.arch.mlp_out_param(16)].rank == 2
    assert all(f["nll"] < 0.05 < f["nll_start"] for f in edit.options["fitted"].values())
    with edit.apply(lm):
        assert efficacy(lm, queries) == [True, True]
