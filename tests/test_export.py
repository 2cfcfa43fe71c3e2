"""Exports on tiny models: PEFT adapters (same logits as our own apply), llama.cpp control vectors (round trip
through gguf's reader, same effect as the edit), GGUF models (read back by our own loader, same logits), prompts."""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clirun import run_cli as run
from personaedit.edits import ActivationEdit, BaseModelInfo, ComposedEdit, ContextEdit, Delta, Intervention, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.export import (ExportError, export_control_vector, export_edit, export_gguf_model, export_peft,
                                export_prompt, formats_for, read_control_vector)
from personaedit.export.gguf_model import permute_rows
from personaedit.methods import fit_edit
from personaedit.models import load_model
from personaedit.persona import Persona
from tiny import tiny_hf_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 33, 9, 60, 41, 7, 101, 250]])


def save_model(folder, family="llama", seed=0):
    tiny_hf_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def factor_edit(lm, names, ranks, seed=0, method="rome"):
    gen = torch.Generator().manual_seed(seed)
    params = dict(lm.model.named_parameters())
    deltas = {name: Delta(u=0.3 * torch.randn(params[name].shape[0], r, generator=gen),
                          v=0.3 * torch.randn(params[name].shape[1], r, generator=gen)) for name, r in zip(names, ranks)}
    return WeightEdit(method=method, persona=Persona.parse("extraversion=high"), base=BaseModelInfo.of(lm), deltas=deltas)


def peft_logits(folder, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, str(adapter)).eval())


def own_logits(lm, edit, strength):
    with edit.apply(lm, strength):
        return logits(lm.model)


# --- peft -------------------------------------------------------------------------------------------

TARGETS = {
    "llama": ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"],
    "qwen2": ["model.layers.2.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"],
    "mistral": ["model.layers.1.mlp.up_proj.weight"],
    "phi3": ["model.layers.1.mlp.gate_up_proj.weight", "model.layers.0.self_attn.o_proj.weight"],
    "gpt2": ["transformer.h.1.mlp.c_proj.weight", "transformer.h.0.attn.c_attn.weight"],  # Conv1D, [in, out]
    "gpt_neox": ["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"],
}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_adapter_gives_the_logits_of_our_own_apply(family, tmp_path):
    folder = save_model(tmp_path / "m", family)
    lm = load_model(folder, device="cpu")
    edit = factor_edit(lm, TARGETS[family], [1, 3][:len(TARGETS[family])])
    result = export_peft(edit, tmp_path / "adapter", strength=1.5, model=folder)
    assert result.details["exact"] and result.details["rank"] == max([1, 3][:len(TARGETS[family])])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["fan_in_fan_out"] == (family == "gpt2")
    assert sorted(config["target_modules"]) == sorted(n.rsplit(".", 1)[0] for n in TARGETS[family])
    ours = peft_logits(folder, tmp_path / "adapter")
    expected = own_logits(lm, edit, 1.5)
    assert (ours - expected).abs().max() <= 1e-4
    assert (expected - logits(lm.model)).abs().max() > 1e-2  # the edit does something


def test_peft_key_names_are_those_peft_itself_saves(tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    edit = factor_edit(lm, TARGETS["llama"], [2, 2])
    export_peft(edit, tmp_path / "ours", model=folder)
    modules = [n.rsplit(".", 1)[0] for n in TARGETS["llama"]]
    theirs = get_peft_model(tiny_hf_model("llama"), LoraConfig(r=2, lora_alpha=2, target_modules=modules))
    theirs.save_pretrained(tmp_path / "theirs")
    shapes = lambda f: {k: tuple(v.shape) for k, v in load_file(str(tmp_path / f / "adapter_model.safetensors")).items()}
    assert shapes("ours") == shapes("theirs")


def test_peft_composed_factors_concatenate_and_dense_deltas_go_through_svd(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    name = TARGETS["llama"][0]
    one, two = factor_edit(lm, [name], [1], seed=1), factor_edit(lm, [name], [2], seed=2)
    composed = ComposedEdit.of(one, two, weights=[1.0, -0.5])
    result = export_peft(composed, tmp_path / "composed", model=folder)
    assert result.details["rank"] == 3 and result.details["exact"]
    assert (peft_logits(folder, tmp_path / "composed") - own_logits(lm, composed, 1.0)).abs().max() <= 1e-4

    low = (0.2 * torch.randn(32, 2)) @ (0.2 * torch.randn(64, 2)).T  # a dense delta of rank 2
    dense = WeightEdit(method="vector", base=BaseModelInfo.of(lm), deltas={name: Delta(dense=low)})
    result = export_peft(dense, tmp_path / "dense", model=folder, rank=4)
    assert result.details["relative_error"] < 1e-5 and "relative error" in result.line()
    assert (peft_logits(folder, tmp_path / "dense") - own_logits(lm, dense, 1.0)).abs().max() <= 1e-4

    full = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(full.double())
    result = export_peft(WeightEdit(method="vector", deltas={name: Delta(dense=full)}), tmp_path / "cut", model=folder, rank=5)
    assert result.details["rank"] == 5 and not result.details["exact"]
    assert result.details["relative_error"] == pytest.approx(float((s[5:] ** 2).sum().sqrt() / s.norm()), rel=1e-6)


def test_peft_refuses_non_linear_parameters_unless_told_to_skip_them(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    linear = factor_edit(lm, [TARGETS["llama"][0]], [1])
    norm = "model.layers.1.post_attention_layernorm.weight"
    both = WeightEdit(method="vector", base=BaseModelInfo.of(lm),
                      deltas={**linear.deltas, norm: Delta(dense=0.1 * torch.ones(32))})
    with pytest.raises(ExportError, match=r"Linear weights only.*layernorm.*--skip-unsupported.*peft, gguf"):
        export_peft(both, tmp_path / "a", model=folder)
    result = export_peft(both, tmp_path / "a", model=folder, skip_unsupported=True)
    assert result.details["skipped"] == [norm] and "skipped 1" in result.line()
    assert (peft_logits(folder, tmp_path / "a") - own_logits(lm, linear, 1.0)).abs().max() <= 1e-4


def test_peft_refuses_other_kinds_and_foreign_folders(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    steer = ActivationEdit(method="steer", interventions=(Intervention("residual", 1, torch.ones(32)),))
    with pytest.raises(ExportError, match=r"steer edit is an activation edit.*can be exported as: control-vector \(with --all-positions\)\)"):
        export_peft(steer, tmp_path / "x", model=folder)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    lm = load_model(folder, device="cpu")
    with pytest.raises(PersonaEditError, match="not an earlier export"):
        export_peft(factor_edit(lm, [TARGETS["llama"][0]], [1]), tmp_path / "busy", model=folder)


def test_peft_from_real_rome_and_palette_edits(tmp_path):
    folder = save_model(tmp_path / "m", "gpt2")
    lm = load_model(folder, device="cpu")
    tiny = dict(layer=1, steps=5, lr=0.05, kl_factor=0.0, clamp=1e4, prefixes=2, prefix_length=5)
    rome = fit_edit("rome", lm, "tf=T", prompt="I love meeting new people at {}", subject="parties", target=" tea", **tiny)
    palette = fit_edit("palette", lm, "jp=P", queries=2, **tiny)
    for name, edit in (("rome", rome), ("palette", palette)):
        result = export_edit(edit.save(tmp_path / name), "peft", tmp_path / f"{name}-peft", strength=2.0)
        assert result.details["exact"] and result.details["modules"] == 1
        assert (peft_logits(folder, tmp_path / f"{name}-peft") - own_logits(lm, edit, 2.0)).abs().max() <= 1e-4


# --- control vectors --------------------------------------------------------------------------------

def steer_edit(lm, layers=(1, 2), positions="all", scale=1.0):
    gen = torch.Generator().manual_seed(3)
    items = tuple(Intervention("residual", layer, torch.randn(32, generator=gen), positions=positions) for layer in layers)
    return ActivationEdit(method="steer", base=BaseModelInfo.of(lm), interventions=items, scale=scale)


def test_control_vector_round_trips_through_gguf_and_acts_like_the_edit(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    edit = steer_edit(lm, scale=0.5)
    result = export_control_vector(edit, tmp_path / "cv.gguf", strength=3.0)
    assert result.details["layers"] == [1, 2] and result.details["model_hint"] == "llama"
    reader = gguf.GGUFReader(str(tmp_path / "cv.gguf"))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for item in edit.interventions:
        assert np.allclose(tensors[f"direction.{item.layer}"], 1.5 * item.values.numpy(), atol=1e-6)
        assert tensors[f"direction.{item.layer}"].dtype == np.float32
    vector = read_control_vector(tmp_path / "cv.gguf")
    assert vector.model_hint == "llama" and sorted(vector.directions) == [1, 2]
    assert torch.allclose(own_logits(lm, vector.to_edit(), 1.0), own_logits(lm, edit, 3.0), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_mlp_neuron_additions_convert_exactly_to_residual_vectors(family, tmp_path):
    folder = save_model(tmp_path / "m", family)
    lm = load_model(folder, device="cpu")
    gen = torch.Generator().manual_seed(5)
    items = (Intervention("mlp_hidden", 1, torch.randn(6, generator=gen), torch.tensor([0, 3, 7, 20, 41, 63]), positions="all"),
             Intervention("mlp_hidden", 2, torch.randn(lm.arch.mlp_size, generator=gen), positions="all"),
             Intervention("residual", 2, torch.randn(32, generator=gen), positions="all"))
    dpnle = ActivationEdit(method="dpnle", base=BaseModelInfo.of(lm), interventions=items)
    result = export_control_vector(dpnle, tmp_path / "cv.gguf", strength=2.0)
    assert result.details["converted"] == 2 and "down_proj" in result.line()
    converted = read_control_vector(tmp_path / "cv.gguf").to_edit()
    assert torch.allclose(own_logits(lm, converted, 1.0), own_logits(lm, dpnle, 2.0), atol=1e-5)


def test_control_vector_refusals(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    generated = steer_edit(lm, positions="generated")
    with pytest.raises(ExportError, match=r"generated positions only.*--all-positions.*exported as: control-vector \(with --all-positions\)"):
        export_control_vector(generated, tmp_path / "a.gguf")
    result = export_control_vector(generated, tmp_path / "a.gguf", all_positions=True)
    assert "every position" in result.line()
    cases = {
        "clamps activations": Intervention("mlp_hidden", 1, torch.zeros(2), torch.tensor([1, 2]), op="ceil", positions="all"),
        "output of layer 0": Intervention("residual", 0, torch.ones(32), positions="all"),
        "inside the layer": Intervention("attn_out", 1, torch.ones(32), positions="all"),
    }
    for reason, item in cases.items():
        edit = ActivationEdit(method="npti", interventions=(item,))
        with pytest.raises(ExportError, match=reason):
            export_control_vector(edit, tmp_path / "b.gguf")
        assert formats_for(edit) == []
    with pytest.raises(ExportError, match="can be exported as: prompt"):
        export_control_vector(ContextEdit(method="prompt", system="Be warm."), tmp_path / "c.gguf")
    gemma = save_model(tmp_path / "g", "gemma2")
    item = Intervention("mlp_hidden", 1, torch.ones(2), torch.tensor([1, 2]), positions="all")
    with pytest.raises(ExportError, match="normalises the MLP's output"):
        export_control_vector(ActivationEdit(method="dpnle", interventions=(item,)), tmp_path / "d.gguf", model=gemma)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PersonaEditError, match="not a GGUF file"):
        export_control_vector(steer_edit(lm), tmp_path / "notes.txt")


# --- gguf models --------------------------------------------------------------------------------------

def test_permutation_is_llama_cpps_and_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    weight = torch.arange(8 * 3 * 2, dtype=torch.float32).reshape(16, 3)
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 4, "num_key_value_heads": 2})
    back = processor._reverse_permute_weights(permute_rows(weight, 4, 4).numpy(), 4, 4)
    assert np.array_equal(back, weight.numpy())
    back = processor._reverse_permute_weights(permute_rows(weight[:8], 4, 2).numpy(), 4, 2)
    assert np.array_equal(back, weight[:8].numpy())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gguf_model_reads_back_through_our_loader_with_the_same_logits(family, tmp_path):
    folder = save_model(tmp_path / "m", family)
    original = load_model(folder, device="cpu")
    result = export_gguf_model(folder, tmp_path / "model.gguf", dtype="f32")
    assert result.details["tokenizer"] == "built"
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    arch = "qwen2" if family == "qwen2" else "llama"
    assert reader.get_field("general.architecture").contents() == arch
    assert reader.get_field(f"{arch}.block_count").contents() == 3
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight"} <= names
    back = load_model(str(tmp_path / "model.gguf"), device="cpu")
    assert type(back.model).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    assert (logits(back.model) - logits(original.model)).abs().max() <= 1e-4
    text = "I love meeting new people at parties."
    assert back.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert back.tokenizer.apply_chat_template(messages, tokenize=False) == original.tokenizer.apply_chat_template(messages, tokenize=False)


def test_gguf_dtypes_edits_and_a_copied_tokenizer(tmp_path):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    f32 = export_gguf_model(folder, tmp_path / "f32.gguf", dtype="f32")
    f16 = export_gguf_model(folder, tmp_path / "f16.gguf", dtype="f16")
    q8 = export_gguf_model(folder, tmp_path / "q8.gguf", dtype="q8_0")
    assert q8.bytes < f16.bytes < f32.bytes
    base = logits(lm.model)
    assert (logits(load_model(str(tmp_path / "f16.gguf")).model) - base).abs().max() <= 2e-2
    assert (logits(load_model(str(tmp_path / "q8.gguf")).model) - base).abs().max() <= 1e-1
    # a weight edit applied at a strength, then written
    edit = factor_edit(lm, TARGETS["llama"], [1, 2])
    export_edit(edit.save(tmp_path / "edit"), "gguf", tmp_path / "edited.gguf", strength=0.7, dtype="f32")
    edited = load_model(str(tmp_path / "edited.gguf"))
    assert (logits(edited.model) - own_logits(lm, edit, 0.7)).abs().max() <= 1e-4
    # a model that came from a GGUF keeps that file's tokenizer metadata as it is
    again = export_gguf_model(str(tmp_path / "f32.gguf"), tmp_path / "again.gguf", dtype="f32")
    assert again.details["tokenizer"] == "copied"
    fields = lambda p: {k: f.contents() for k, f in gguf.GGUFReader(str(p)).fields.items() if k.startswith("tokenizer.")}
    assert fields(tmp_path / "again.gguf") == fields(tmp_path / "f32.gguf")


def test_gguf_refuses_other_architectures_and_non_weight_edits(tmp_path):
    folder = save_model(tmp_path / "m", "gpt2")
    with pytest.raises(PersonaEditError, match="llama family.*'gpt2'"):
        export_gguf_model(folder, tmp_path / "x.gguf")
    lm = load_model(folder, device="cpu")
    with pytest.raises(ExportError, match="changes no weight"):
        export_edit(steer_edit(lm), "gguf", tmp_path / "x.gguf", model=folder)


# --- prompts ------------------------------------------------------------------------------------------

def test_prompt_export_of_prompt_ike_and_refusal_of_serac(tmp_path):
    from tiny import tiny_lm

    lm = tiny_lm("llama")
    prompt = fit_edit("prompt", lm, "extraversion=high")
    result = export_prompt(prompt, tmp_path / "p.json", strength=1.0)
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["system"] == prompt.context_at(1.0).system and data["messages"] == [{"role": "system", "content": data["system"]}]
    assert result.details["messages"] == 1
    ike = fit_edit("ike", lm, "agreeableness=low", k=3)
    data = json.loads(export_prompt(ike, tmp_path / "ike.json").path.read_text())
    assert data["system"] is None and len(data["demonstrations"]) == 3 and len(data["messages"]) == 6
    assert data["messages"][1] == {"role": "assistant", "content": data["demonstrations"][0]["assistant"]}
    both = json.loads(export_prompt(prompt + ike, tmp_path / "both.json").path.read_text())
    assert both["system"] == prompt.system and len(both["messages"]) == 7
    from personaedit.edits import RoutedEdit

    serac = RoutedEdit(method="serac", topics=("chess",), keys=torch.ones(1, 4))
    with pytest.raises(ExportError, match="scope classifier"):
        export_prompt(serac, tmp_path / "s.json")
    assert formats_for(serac) == [] and formats_for(prompt) == ["prompt"]


# --- the command ---------------------------------------------------------------------------------------



def test_cli_export_one_line_and_exit_2_naming_the_formats(tmp_path, capsys):
    folder = save_model(tmp_path / "m", "llama")
    lm = load_model(folder, device="cpu")
    factor_edit(lm, TARGETS["llama"], [1, 1]).save(tmp_path / "rome")
    steer_edit(lm).save(tmp_path / "steer")
    code, out, err = run(["export", str(tmp_path / "rome"), "--format", "peft", "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and out.count("\n") == 1 and out.startswith(f"peft: wrote {tmp_path / 'a'} (LoRA rank 1 on 2 modules, exact")
    code, out, err = run(["export", str(tmp_path / "steer"), "--format", "peft", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "can be exported as: control-vector" in err
    code, out, err = run(["export", str(tmp_path / "steer"), "--format", "control-vector", "--out", str(tmp_path / "c.gguf"),
                          "--strength", "2"], capsys)
    assert code == 0 and out.startswith("control-vector: wrote") and "layers 1, 2" in out
    code, out, err = run(["export", str(tmp_path / "steer"), "--format", "onnx", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "unknown format 'onnx'" in err
    code, out, err = run(["export", folder, "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"], capsys)
    assert code == 0 and out.startswith("gguf: wrote") and "llama model" in out
    code, out, err = run(["export", str(tmp_path / "nothing"), "--format", "peft", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "not an edit folder" in err
    (tmp_path / "file").write_text("x")
    code, out, err = run(["export", str(tmp_path / "rome"), "--format", "peft", "--out", str(tmp_path / "file" / "a")], capsys)
    assert code == 2 and err.startswith(f"error: cannot export to {tmp_path / 'file' / 'a'}") and err.count("\n") == 1
