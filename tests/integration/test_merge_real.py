"""A merge into the real default model: the merged folder loads, and equals the vector applied in memory."""

import pytest
import torch

from personaedit.edits import BaseModelInfo, Delta, WeightEdit
from personaedit.merge import MergeConfig, VectorRef, merge
from personaedit.merge.tensorfile import SafetensorsReader
from personaedit.models import load_model
from personaedit.persona import Persona

pytestmark = pytest.mark.integration


def test_merged_default_model_matches_the_edit_applied_in_memory(tmp_path):
    lm = load_model("default")
    gen = torch.Generator().manual_seed(0)
    names = [lm.arch.mlp_out_param(15), "model.layers.3.self_attn.q_proj.weight"]
    params = dict(lm.model.named_parameters())
    deltas = {n: Delta(u=0.05 * torch.randn(params[n].shape[0], 2, generator=gen), v=0.05 * torch.randn(params[n].shape[1], 2, generator=gen))
              for n in names}
    edit = WeightEdit(method="vector", persona=Persona.parse("extraversion=high"), base=BaseModelInfo.of(lm), deltas=deltas)
    edit.save(tmp_path / "vector")
    result = merge(MergeConfig(base="default", vectors=[VectorRef(path=tmp_path / "vector", weight=-0.5)]), tmp_path / "merged")
    assert result.tensors_merged == 2 and result.shards == 1
    merged = load_model(str(tmp_path / "merged"))
    ids = lm.tokenizer("I love meeting new people at parties.", return_tensors="pt").input_ids
    with torch.no_grad(), edit.apply(lm, -0.5):
        expected = lm.model(ids).logits
        for name in names:
            assert torch.equal(merged.model.get_parameter(name), lm.model.get_parameter(name)), name
    with torch.no_grad():
        assert torch.equal(merged.model(ids).logits, expected)
    base_file = SafetensorsReader(lm.source + "/model.safetensors")
    out_file = SafetensorsReader(tmp_path / "merged" / "model.safetensors")
    for key in ("model.embed_tokens.weight", "model.layers.15.mlp.up_proj.weight"):
        assert torch.equal(base_file.read(key), out_file.read(key))
