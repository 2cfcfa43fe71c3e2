"""The streaming merge engine, the per-tensor merge methods and vector analysis, on tiny models."""

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file

from personaedit.edits import ActivationEdit, BaseModelInfo, Delta, Intervention, WeightEdit
from personaedit.errors import EditError, PersonaEditError
from personaedit.merge import MergeConfig, VectorRef, cosine_matrix, layer_of, load_config, merge, summarise
from personaedit.merge.config import parse_size, parse_vector_option
from personaedit.merge.methods import MergeOptions, dare, dare_generator, magnitude_threshold, merge_deltas, rescale_kept, trim
from personaedit.merge.tensorfile import SafetensorsReader
from personaedit.models import wrap_model
from personaedit.persona import Persona
from tiny import tiny_hf_model, tiny_tokenizer


def save_model(folder, family="llama", seed=0):
    model = tiny_hf_model(family, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


def make_vector(folder, model, seed=0, rank=None, scale=1.0, only=None, persona="extraversion=high"):
    """Random perturbations of every 2-D weight (or of those in `only`), dense or as rank-`rank` factors."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, param in model.named_parameters():
        if param.dim() != 2 or (only is not None and name not in only):
            continue
        if rank is None:
            deltas[name] = Delta(dense=0.01 * torch.randn(param.shape, generator=gen))
        else:
            deltas[name] = Delta(u=0.1 * torch.randn(param.shape[0], rank, generator=gen),
                                 v=0.1 * torch.randn(param.shape[1], rank, generator=gen))
    lm = wrap_model(model, tiny_tokenizer(), spec="tiny")
    edit = WeightEdit(method="vector", persona=Persona.parse(persona), base=BaseModelInfo.of(lm), deltas=deltas, scale=scale)
    edit.save(folder)
    return edit


def params_of(folder):
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return dict(model.named_parameters())


def run_merge(base, vectors, out, method="task_arithmetic", **options):
    config = MergeConfig(base=str(base), method=method, vectors=[VectorRef(path=p, weight=w) for p, w in vectors], **options)
    return merge(config, out)


# --- per-tensor methods against hand-computed cases -------------------------------------------------

def test_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([3.0, -1.0, 0.5, -2.0])
    assert magnitude_threshold(delta.abs(), 0.5) == 2.0 and trim(delta, 2.0).tolist() == [3.0, 0.0, 0.0, -2.0]
    assert magnitude_threshold(delta.abs(), 1.0) == 0.0 and magnitude_threshold(delta.abs(), 0.25) == 3.0
    assert magnitude_threshold(delta.abs(), 0.01) == float("inf")
    big = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    assert magnitude_threshold(big.abs(), 0.3) == float(big.abs().topk(3000).values.min())


def test_ties_hand_computed():
    deltas = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-2.5, 2.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 0.0, -4.0])]
    # Trimmed to half: [3,0,0,-2], [-2.5,2,0,0], [1,0,0,-4]; summed [1.5,2,0,-6] elects signs [+,+,0,-];
    # agreeing entries: {3,1}, {2}, {}, {-2,-4}.
    assert merge_deltas("ties", deltas, [1, 1, 1], MergeOptions(density=0.5, normalize=False)).tolist() == [4.0, 2.0, 0.0, -6.0]
    assert merge_deltas("ties", deltas, [1, 1, 1], MergeOptions(density=0.5, normalize=True)).tolist() == [2.0, 2.0, 0.0, -3.0]


def test_ties_elects_signs_from_weighted_values():
    # Weighted values [1,2] and [-3,1]: sum [-2,3] elects [-,+]; agreeing: {-3}, {2,1}.
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]
    assert merge_deltas("ties", deltas, [1, -1], MergeOptions(density=1.0, normalize=False)).tolist() == [-3.0, 3.0]
    assert merge_deltas("ties", deltas, [1, -1], MergeOptions(density=1.0, normalize=True)).tolist() == [-3.0, 1.5]


def test_dare_hand_computed_and_deterministic():
    delta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rescale_kept(delta, torch.tensor([True, False, True, False]), 0.5).tolist() == [2.0, 0.0, 6.0, 0.0]
    assert rescale_kept(delta, torch.tensor([True, True, True, False]), 0.75).tolist() == [4.0, 8.0, 12.0, 0.0]
    big = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    once = dare(big, 0.5, dare_generator(0, 0, "w"))
    assert torch.equal(once, dare(big, 0.5, dare_generator(0, 0, "w")))
    assert not torch.equal(once, dare(big, 0.5, dare_generator(1, 0, "w")))
    assert not torch.equal(once, dare(big, 0.5, dare_generator(0, 1, "w")))
    survivors = once != 0
    assert torch.equal(once[survivors], 2 * big[survivors])
    assert 400 < int(survivors.sum()) < 600


def test_dare_is_unbiased_in_expectation():
    delta = torch.linspace(-1, 1, 50)
    draws = torch.stack([dare(delta, 0.7, dare_generator(seed, 0, "w")) for seed in range(2000)])
    # Per entry the standard error is |δ| sqrt(p/(1-p)) / sqrt(2000) ≈ 0.034 |δ|.
    assert (draws.mean(0) - delta).abs().max() < 5 * 0.034 * delta.abs().max()
    ones = dare(torch.ones(200_000), 0.5, dare_generator(3, 0, "w"))
    assert abs(float(ones.mean()) - 1.0) < 0.01  # 4.5 standard errors


def test_dare_variants_reduce_to_their_base_method_without_drops():
    deltas = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-3.0, -1.0, 1.5])]
    options = MergeOptions(drop=0.0, normalize=True)
    assert torch.equal(merge_deltas("dare_linear", deltas, [0.5, 2], options, "w"),
                       merge_deltas("task_arithmetic", deltas, [0.5, 2], options, "w"))
    assert torch.equal(merge_deltas("dare_ties", deltas, [0.5, 2], options, "w"),
                       merge_deltas("ties", deltas, [0.5, 2], MergeOptions(density=1.0, normalize=True), "w"))


# --- the engine ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gpt_neox", "phi3", "gemma2"])
def test_task_arithmetic_exact_against_the_formula(tmp_path, family):
    base, model = save_model(tmp_path / "base", family)
    one = make_vector(tmp_path / "v1", model, seed=1)
    two = make_vector(tmp_path / "v2", model, seed=2, rank=2)
    result = run_merge(base, [(tmp_path / "v1", 0.7), (tmp_path / "v2", -0.4)], tmp_path / "out")
    merged = params_of(tmp_path / "out")
    for name, param in model.named_parameters():
        expected = param.detach().clone()
        if name in one.deltas:
            expected = expected + 0.7 * one.deltas[name].materialise("cpu") - 0.4 * two.deltas[name].materialise("cpu")
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert result.tensors_merged == len(one.deltas) and result.shards == 1


def test_untouched_tensors_are_byte_identical_and_files_copied(tmp_path):
    base, model = save_model(tmp_path / "base")
    make_vector(tmp_path / "v", model, only={"model.layers.1.mlp.down_proj.weight"})
    run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "out")
    before, after = SafetensorsReader(base / "model.safetensors"), SafetensorsReader(tmp_path / "out" / "model.safetensors")
    assert set(before.tensors) == set(after.tensors)
    for name in before.tensors:
        same = before.read(name).view(torch.uint8).equal(after.read(name).view(torch.uint8))
        assert same == (name != "model.layers.1.mlp.down_proj.weight"), name
    for copied in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / copied).read_bytes() == (base / copied).read_bytes()
    record = json.loads((tmp_path / "out" / "personaedit-merge.json").read_text())
    assert record["tensors_merged"] == 1 and record["vectors"][0]["persona"] == {"extraversion": 1.0}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:  # the reference reader agrees
        assert handle.metadata() == {"format": "pt"}
    reference = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(reference[k], after.read(k)) for k in reference)


@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {"density": 1.0, "normalize": True}),
                                            ("ties", {"density": 1.0, "normalize": False}),
                                            ("dare_ties", {"drop": 0.0, "normalize": True})])
def test_negation_gives_theta_minus_phi(tmp_path, method, options):
    base, model = save_model(tmp_path / "base")
    vector = make_vector(tmp_path / "v", model, seed=3)
    run_merge(base, [(tmp_path / "v", -1.0)], tmp_path / "out", method=method, **options)
    merged = params_of(tmp_path / "out")
    for name, delta in vector.deltas.items():
        torch.testing.assert_close(merged[name], model.get_parameter(name) - delta.dense, rtol=1e-6, atol=1e-7)


def test_an_edit_saved_negated_stays_negated(tmp_path):
    base, model = save_model(tmp_path / "base")
    vector = make_vector(tmp_path / "v", model, seed=3, scale=-0.5)
    run_merge(base, [(tmp_path / "v", 2.0)], tmp_path / "out")
    merged = params_of(tmp_path / "out")
    name, delta = next(iter(vector.deltas.items()))
    torch.testing.assert_close(merged[name], model.get_parameter(name) - delta.dense, rtol=1e-6, atol=1e-7)


def test_ties_merge_on_a_model_matches_the_per_tensor_method(tmp_path):
    base, model = save_model(tmp_path / "base", "qwen2")
    one, two = make_vector(tmp_path / "v1", model, seed=1), make_vector(tmp_path / "v2", model, seed=2)
    run_merge(base, [(tmp_path / "v1", 1.0), (tmp_path / "v2", 0.5)], tmp_path / "out", method="ties", density=0.3, normalize=True)
    merged = params_of(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    change = merged[name] - model.get_parameter(name)
    expected = merge_deltas("ties", [one.deltas[name].dense, two.deltas[name].dense], [1.0, 0.5],
                                           MergeOptions(density=0.3, normalize=True), name)
    torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)
    assert 0.3 <= float((change != 0).float().mean()) <= 0.6  # trimmed: at most 2 × 30% of entries survive


def test_dare_merge_is_reproducible_by_seed(tmp_path):
    base, model = save_model(tmp_path / "base")
    make_vector(tmp_path / "v1", model, seed=1), make_vector(tmp_path / "v2", model, seed=2)
    vectors = [(tmp_path / "v1", 0.5), (tmp_path / "v2", 0.5)]
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_merge(base, vectors, tmp_path / out, method="dare_ties", drop=0.5, seed=seed, normalize=False)
    data = {out: (tmp_path / out / "model.safetensors").read_bytes() for out in "abc"}
    assert data["a"] == data["b"] and data["a"] != data["c"]


@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {"density": 0.2, "normalize": True}),
                                            ("dare_ties", {"drop": 0.3, "seed": 5, "normalize": False}),
                                            ("dare_linear", {"drop": 0.6, "seed": 1})])
def test_block_by_block_equals_whole_tensors(tmp_path, method, options):
    base, model = save_model(tmp_path / "base", "gemma")
    one = make_vector(tmp_path / "v1", model, seed=1, only={"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"})
    two = make_vector(tmp_path / "v2", model, seed=2)
    make_vector(tmp_path / "v3", model, seed=3, rank=3)
    vectors = [(tmp_path / "v1", 0.8), (tmp_path / "v2", -0.6)]
    config = MergeConfig(base=str(base), method=method, vectors=[VectorRef(path=p, weight=w) for p, w in vectors], **options)
    merge(config, tmp_path / "whole")
    merge(config, tmp_path / "blocks", block_elements=100)  # 3 rows of the embedding per block
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "blocks" / "model.safetensors").read_bytes()
    # ... and both equal the in-memory method on whole tensors.
    name = "model.embed_tokens.weight"
    expected = merge_deltas(method, [one.deltas[name].dense, two.deltas[name].dense], [0.8, -0.6],
                            MergeOptions(**options), key=name)
    torch.testing.assert_close(params_of(tmp_path / "blocks")[name], model.get_parameter(name) + expected, rtol=1e-6, atol=1e-7)
    if method == "ties":
        return  # with factors, an entry at the trim threshold may fall either side of it after the rounding below
    # Factors multiplied block by block may round differently in the last bit (BLAS), nothing more.
    config = config.model_copy(update={"vectors": [*config.vectors, VectorRef(path=tmp_path / "v3", weight=0.5)]})
    merge(config, tmp_path / "whole3")
    merge(config, tmp_path / "blocks3", block_elements=100)
    whole, blocks = params_of(tmp_path / "whole3"), params_of(tmp_path / "blocks3")
    for key in whole:
        torch.testing.assert_close(blocks[key], whole[key], rtol=1e-5, atol=1e-7)


def test_sharded_output_with_an_index_equals_the_single_file(tmp_path):
    base, model = save_model(tmp_path / "base", "gpt2")
    make_vector(tmp_path / "v", model, seed=1, rank=1)
    run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "one")
    result = run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "many", max_shard_size="20KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert result.shards > 2 and len(set(index["weight_map"].values())) == result.shards
    single, sharded = params_of(tmp_path / "one"), params_of(tmp_path / "many")
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    # A sharded base is read through its index too.
    run_merge(tmp_path / "many", [(tmp_path / "v", -1.0)], tmp_path / "back")
    torch.testing.assert_close(params_of(tmp_path / "back")["transformer.h.0.mlp.c_fc.weight"],
                               model.get_parameter("transformer.h.0.mlp.c_fc.weight"), rtol=0, atol=1e-6)


def test_transfer_to_another_model_of_the_same_shapes(tmp_path):
    _, source = save_model(tmp_path / "source", seed=0)
    target, target_model = save_model(tmp_path / "target", seed=7)
    vector = make_vector(tmp_path / "v", source, seed=1)
    run_merge(target, [(tmp_path / "v", 1.0)], tmp_path / "out")
    name, delta = next(iter(vector.deltas.items()))
    torch.testing.assert_close(params_of(tmp_path / "out")[name], target_model.get_parameter(name) + delta.dense)


def test_refusals(tmp_path):
    base, model = save_model(tmp_path / "base")
    _, gpt2 = save_model(tmp_path / "gpt2", "gpt2")
    make_vector(tmp_path / "gpt2-vector", gpt2)
    with pytest.raises(EditError, match="does not have"):
        run_merge(base, [(tmp_path / "gpt2-vector", 1.0)], tmp_path / "out")
    wrong = WeightEdit(method="vector", deltas={"model.layers.0.mlp.down_proj.weight": Delta(dense=torch.zeros(5, 7))})
    wrong.save(tmp_path / "wrong")
    with pytest.raises(EditError, match=r"shape \(5, 7\) in the vector and \(32, 64\)"):
        run_merge(base, [(tmp_path / "wrong", 1.0)], tmp_path / "out")
    ActivationEdit(method="steer", interventions=(Intervention("residual", 1, torch.ones(32)),)).save(tmp_path / "act")
    with pytest.raises(EditError, match="activation edit, not a personality vector"):
        run_merge(base, [(tmp_path / "act", 1.0)], tmp_path / "out")
    make_vector(tmp_path / "v", model)
    with pytest.raises(PersonaEditError, match="does not use --density"):
        run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "out", density=0.5)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(PersonaEditError, match="refusing to overwrite"):
        run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "precious")
    assert not (tmp_path / "out").exists()


def test_yaml_config_paths_relative_to_the_file_and_overrides(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "merge.yaml"
    path.write_text("base: default\nmethod: ties\ndensity: 0.3\nnormalize: false\nvectors:\n"
                    "  - {path: vecs/e, weight: 0.5}\n  - {path: vecs/a, weight: -0.3}\nout: merged\n")
    config = load_config(path, density=0.5)
    assert config.vectors[0].path == tmp_path / "cfg" / "vecs" / "e" and config.vectors[1].weight == -0.3
    assert config.out == tmp_path / "cfg" / "merged" and config.options() == MergeOptions(density=0.5, normalize=False)
    path.write_text("method: ties\nvectors: [{path: v}]\ndensty: 0.3\n")
    with pytest.raises(PersonaEditError, match="densty"):
        load_config(path)
    with pytest.raises(PersonaEditError, match="unknown merge method"):
        MergeConfig(method="slerp", vectors=[VectorRef(path="v")])
    assert parse_vector_option("a/b=c=-0.5") == VectorRef(path="a/b=c", weight=-0.5)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20
    with pytest.raises(PersonaEditError):
        parse_size("lots")


# --- analysis --------------------------------------------------------------------------------------

def test_cosine_matrix_and_layer_norms(tmp_path):
    _, model = save_model(tmp_path / "base")
    one = make_vector(tmp_path / "v1", model, seed=1)
    two = make_vector(tmp_path / "v2", model, seed=2, rank=2, only={"model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"})
    make_vector(tmp_path / "v3", model, seed=1, scale=-2.0)

    def flat(edit):
        return torch.cat([edit.scale * edit.deltas[n].materialise("cpu").reshape(-1) if n in edit.deltas else torch.zeros(p.numel())
                          for n, p in model.named_parameters() if p.dim() == 2])

    cos = cosine_matrix([tmp_path / "v1", tmp_path / "v2", tmp_path / "v3"])
    a, b = flat(one), flat(two)
    assert cos[0][1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    assert cos[0][0] == pytest.approx(1.0) and cos[0][2] == pytest.approx(-1.0) and cos[1][0] == cos[0][1]
    summary = summarise(tmp_path / "v1")
    assert set(summary.layer_norms) == {"0", "1", "2", "other"} and summary.parameters == len(one.deltas)
    assert summary.norm == pytest.approx(float(a.norm()), rel=1e-5)
    assert sum(n * n for n in summary.layer_norms.values()) == pytest.approx(summary.norm ** 2, rel=1e-6)
    layer1 = torch.cat([d.dense.reshape(-1) for n, d in one.deltas.items() if n.startswith("model.layers.1.")])
    assert summary.layer_norms["1"] == pytest.approx(float(layer1.norm()), rel=1e-5)
    assert summarise(tmp_path / "v2").low_rank == 2


def test_layer_of_knows_each_layout():
    assert layer_of("model.layers.12.mlp.down_proj.weight", "llama") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight", "gpt2") == 3
    assert layer_of("gpt_neox.layers.0.attention.dense.weight") == 0
    assert layer_of("model.embed_tokens.weight", "llama") is None


# --- command line ----------------------------------------------------------------------------------

from clirun import run_cli  # noqa: E402  (beside the command-line tests it serves)


def test_cli_merge_with_options_and_config(tmp_path, capsys):
    base, model = save_model(tmp_path / "base")
    one, two = make_vector(tmp_path / "v1", model, seed=1), make_vector(tmp_path / "v2", model, seed=2, rank=1)
    code, out, _ = run_cli(["merge", "--base", str(base), "--vector", f"{tmp_path / 'v1'}=0.5", "--vector", f"{tmp_path / 'v2'}=-1",
                            "--method", "dare_linear", "--drop", "0.0", "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and "changed 23 of 30 tensors" in out
    name = "model.layers.2.self_attn.o_proj.weight"
    expected = model.get_parameter(name) + 0.5 * one.deltas[name].dense - two.deltas[name].materialise("cpu")
    torch.testing.assert_close(params_of(tmp_path / "out")[name], expected, rtol=1e-6, atol=1e-7)
    (tmp_path / "merge.yaml").write_text(f"base: {base}\nmethod: ties\ndensity: 0.5\nvectors:\n  - {{path: v1, weight: 1}}\n")
    code, _, _ = run_cli(["merge", "--config", str(tmp_path / "merge.yaml"), "--no-normalize", "--out", str(tmp_path / "out2")], capsys)
    record = json.loads((tmp_path / "out2" / "personaedit-merge.json").read_text())
    assert code == 0 and record["options"] == {"density": 0.5, "normalize": False}
    code, _, err = run_cli(["merge", "--base", str(base), "--vector", str(tmp_path / "v1"), "--method", "ties", "--drop", "0.3",
                            "--out", str(tmp_path / "out3")], capsys)
    assert code == 2 and err == "error: merge method ties does not use --drop (it uses: density, normalize)\n"


def test_cli_vector_info(tmp_path, capsys):
    _, model = save_model(tmp_path / "base")
    make_vector(tmp_path / "v1", model, seed=1), make_vector(tmp_path / "v2", model, seed=1, scale=-1.0)
    code, out, _ = run_cli(["vector", "info", str(tmp_path / "v1"), str(tmp_path / "v2"), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["cosine"][0][1] == pytest.approx(-1.0) and set(data["vectors"][0]["layer_norms"]) == {"0", "1", "2", "other"}
    code, out, _ = run_cli(["vector", "info", str(tmp_path / "v1")], capsys)
    assert code == 0 and "norm per layer" in out and "extraversion=+1" in out
    code, _, err = run_cli(["vector", "info", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a personality vector" in err


def test_a_killed_merges_temporary_is_removed_by_the_next_merge(tmp_path):
    """kill -9 leaves the model-sized temporary folder beside --out; the next merge of that target removes it."""
    import subprocess
    import sys

    base, model = save_model(tmp_path / "base")
    make_vector(tmp_path / "v", model, rank=2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leaked = tmp_path / f".merged.tmp-{gone.pid}-1f2e"
    leaked.mkdir(mode=0o700)
    (leaked / "model.safetensors").write_bytes(b"\0" * 4096)
    other = tmp_path / f".othermerge.tmp-{gone.pid}-1f2e"  # another target's: not this merge's to remove
    other.mkdir()
    run_merge(base, [(tmp_path / "v", 1.0)], tmp_path / "merged")
    assert not leaked.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".othermerge.tmp-%d-1f2e" % gone.pid, "base", "merged", "v"]


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.3}), ("dare_linear", {"drop": 0.5})])
def test_blocks_are_merged_in_buffers_allocated_once_per_merge(tmp_path, monkeypatch, method, options):
    """Fresh block memory per tensor let glibc's heap grow with the number of tensors (issue 18): every merged
    block must be one of the workspace's output buffers, and every base or dense δ block read into a buffer."""
    from personaedit.merge import engine
    from personaedit.merge.tensorfile import SafetensorsWriter

    base, model = save_model(tmp_path / "base", "llama")
    make_vector(tmp_path / "dense", model, seed=1)
    make_vector(tmp_path / "factors", model, seed=2, rank=2)
    spaces, written, fresh_reads = [], [], []
    make_space, write, read_bytes = engine._Workspace.__init__, SafetensorsWriter.write, SafetensorsReader._read_bytes

    def space_init(self, *args, **kwargs):
        make_space(self, *args, **kwargs)
        spaces.append(self)

    def recording_write(self, name, tensor):
        written.append((name, tensor.data_ptr(), tensor.numel() * tensor.element_size()))
        write(self, name, tensor)

    def recording_read(self, info, offset, size, into=None):
        if into is None and not info.name.endswith((".u", ".v")):  # factors are small: read fresh
            fresh_reads.append(info.name)
        return read_bytes(self, info, offset, size, into)

    monkeypatch.setattr(engine._Workspace, "__init__", space_init)
    monkeypatch.setattr(SafetensorsWriter, "write", recording_write)
    monkeypatch.setattr(SafetensorsReader, "_read_bytes", recording_read)
    config = MergeConfig(base=str(base), method=method, max_shard_size="40KB",
                         vectors=[VectorRef(path=tmp_path / "dense", weight=0.7), VectorRef(path=tmp_path / "factors", weight=-0.4)],
                         **options)
    result = merge(config, tmp_path / "out", block_elements=64)
    assert result.shards > 1 and len(spaces) == 1 and len(written) > 20
    ring = [(int(b.data_ptr()), b.numel()) for b in spaces[0].ring]
    outside = [(name, nbytes) for name, ptr, nbytes in written
               if not any(start <= ptr and ptr + nbytes <= start + size for start, size in ring)]
    assert not outside, f"merged blocks in fresh memory: {outside[:3]}"
    assert not fresh_reads, f"blocks read into fresh memory: {fresh_reads[:3]}"
