"""`vector from-finetune`: φ = θ_F − θ_B streamed per tensor, readable by every consumer of personality vectors."""

import json

import pytest
import torch
import transformers as T

from personaedit.cli import main
from personaedit.edits import load_edit
from personaedit.errors import EditError, PersonaEditError
from personaedit.merge import MergeConfig, VectorRef, merge
from personaedit.models import load_model
from personaedit.vectors.finetune import vector_from_finetune
from tiny import tiny_hf_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 33, 9, 60, 41, 7]])


def save(folder, model):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def fine_tune(family="llama", seed=0, only=None, dtype=torch.float32):
    """A 'fine-tune': the base with some parameters nudged (all 2-D weights, or those in `only`)."""
    model = tiny_hf_model(family, seed)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (only is None and param.dim() == 2) or (only is not None and name in only):
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model.to(dtype)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vector_reproduces_the_fine_tune_through_apply_and_merge(family, tmp_path):
    base = save(tmp_path / "base", tiny_hf_model(family))
    tuned_model = fine_tune(family)
    tuned = save(tmp_path / "tuned", tuned_model)
    result = vector_from_finetune(base, tuned, tmp_path / "vector", persona="extraversion=high", block_elements=100)
    assert result.changed == sum(1 for p in tuned_model.parameters() if p.dim() == 2) and result.changed < result.parameters
    assert "parameters changed" in result.line()
    vector = load_edit(tmp_path / "vector")
    lm = load_model(base, device="cpu")
    assert vector.method == "vector" and vector.persona.spec() == "extraversion=high"
    assert vector.base.fingerprint == lm.fingerprint and vector.base.spec == base  # made for the base, as loaded
    assert all(d.dense is not None and d.dense.dtype == torch.float32 for d in vector.deltas.values())
    with vector.apply(lm, 1.0):
        assert torch.allclose(logits(lm.model), logits(tuned_model), atol=1e-5)
    # merge --vector takes it: base + φ is the fine-tune
    merged = merge(MergeConfig(base=base, vectors=[VectorRef(path=tmp_path / "vector", weight=1.0)]), tmp_path / "merged")
    assert merged.tensors_merged == result.changed
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for (name, a), b in zip(again.named_parameters(), tuned_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_half_precision_storage_and_only_changed_tensors(tmp_path):
    base = save(tmp_path / "base", tiny_hf_model("llama"))
    only = {"model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    tuned = save(tmp_path / "tuned", fine_tune("llama", only=only))
    result = vector_from_finetune(base, tuned, tmp_path / "v", dtype="bfloat16")
    vector = load_edit(tmp_path / "v")
    assert set(vector.deltas) == only and result.changed == 2
    assert all(d.dense.dtype == torch.bfloat16 for d in vector.deltas.values())
    meta = json.loads((tmp_path / "v" / "edit.json").read_text())
    assert meta["options"]["source"] == "finetune" and meta["payload"]["deltas"]["model.norm.weight"]["shape"] == [32]


def test_refusals_name_what_differs(tmp_path):
    base = save(tmp_path / "base", tiny_hf_model("llama"))
    with pytest.raises(EditError, match="model_type is 'qwen2' there and 'llama'"):
        vector_from_finetune(base, save(tmp_path / "qwen", tiny_hf_model("qwen2")), tmp_path / "v")
    wider = T.LlamaConfig(**{**tiny_hf_model("llama").config.to_dict(), "intermediate_size": 96})
    with pytest.raises(EditError, match="intermediate_size is 96"):
        vector_from_finetune(base, save(tmp_path / "wide", T.LlamaForCausalLM(wider)), tmp_path / "v")
    with pytest.raises(PersonaEditError, match="same model"):
        vector_from_finetune(base, base, tmp_path / "v")
    with pytest.raises(PersonaEditError, match="nothing to save"):
        vector_from_finetune(base, save(tmp_path / "copy", tiny_hf_model("llama")), tmp_path / "v")
    # a tensor missing from the fine-tune
    from safetensors.torch import load_file, save_file

    pruned = save(tmp_path / "pruned", fine_tune("llama"))
    tensors = load_file(f"{pruned}/model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, f"{pruned}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EditError, match="lacks model.layers.2.mlp.up_proj.weight"):
        vector_from_finetune(base, pruned, tmp_path / "v")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(PersonaEditError, match="refusing to overwrite"):
        vector_from_finetune(base, save(tmp_path / "t2", fine_tune("llama")), tmp_path / "busy")


def test_cli_from_finetune_then_merge(tmp_path, capsys):
    base = save(tmp_path / "base", tiny_hf_model("llama"))
    tuned = save(tmp_path / "tuned", fine_tune("llama"))
    try:
        main(["vector", "from-finetune", "--base", base, "--finetuned", tuned, "--out", str(tmp_path / "v")])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"wrote personality vector {tmp_path / 'v'}") and out.count("\n") == 1
    try:
        main(["merge", "--base", base, "--vector", f"{tmp_path / 'v'}=-1", "--out", str(tmp_path / "m")])
        code = 0
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    negated = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    b, t = tiny_hf_model("llama"), T.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    theta = dict(negated.named_parameters())[name]
    expected = 2 * dict(b.named_parameters())[name] - dict(t.named_parameters())[name]
    assert torch.allclose(theta, expected, atol=1e-6)
