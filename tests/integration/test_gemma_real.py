"""Gemma-3-270M (Q4_K_M, from its wheels) as the second real model: it resolves by name, loads, generates, and
takes an activation edit that is removed exactly. Skipped where the optional wheels are not installed
(`PERSONAEDIT_GEMMA=1 bash scripts/dev.sh setup` installs them)."""

import importlib.util

import pytest
import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.models import generate, load_model
from personaedit.models.loading import GEMMA_PACKAGE

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec(GEMMA_PACKAGE) is None, reason="Gemma wheels not installed")]


def test_gemma_loads_by_name_generates_and_takes_an_edit():
    lm = load_model("gemma-3-270m")
    assert lm.arch.model_type.startswith("gemma3") and lm.arch.num_layers == 18
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = generate(lm, ["The capital of France is"], max_new_tokens=6)
    edit = ActivationEdit(method="test", base=BaseModelInfo.of(lm), interventions=(
        Intervention("residual", 6, torch.full((lm.arch.hidden_size,), 40.0), positions="all"),))
    with edit.apply(lm):
        steered = generate(lm, ["The capital of France is"], max_new_tokens=6)
    assert steered != plain and generate(lm, ["The capital of France is"], max_new_tokens=6) == plain
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
