import json

import pytest
import torch
from safetensors import safe_open

from personaedit.edits import (
    ActivationEdit, BaseModelInfo, ComposedEdit, ContextEdit, Delta, Intervention, WeightEdit, load_edit,
)
from personaedit.errors import EditError
from personaedit.methods.prompt import prompt_edit
from personaedit.models import generate
from personaedit.models.generation import build_messages
from personaedit.models.hooks import generated_from
from personaedit.persona import Persona
from tiny import FAMILIES, tiny_lm

IDS = torch.tensor([[5, 9, 40, 77, 12, 31]])


def logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids).logits


def snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_bit_identical(lm, saved):
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def rank_one_edit(lm, layer=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim = lm.arch.mlp_out_weight(layer).shape
    u, v = lm.arch.mlp_out_factors(layer, torch.randn(out_dim, 1, generator=gen), torch.randn(in_dim, 1, generator=gen))
    return WeightEdit(method="test", base=BaseModelInfo.of(lm), deltas={lm.arch.mlp_out_param(layer): Delta(u=u, v=v)})


def steering_edit(lm, layer=1, positions="all"):
    vector = torch.linspace(-1, 1, lm.arch.hidden_size)
    return ActivationEdit(method="test", base=BaseModelInfo.of(lm),
                          interventions=(Intervention("residual", layer, vector, positions=positions),))


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_edit_changes_output_and_restores_bit_exactly(family):
    lm = tiny_lm(family)
    saved, before = snapshot(lm), logits(lm)
    edit = rank_one_edit(lm)
    with edit.apply(lm, strength=3.0):
        assert not torch.allclose(logits(lm), before)
    assert_bit_identical(lm, saved)
    assert torch.equal(logits(lm), before)


def test_weight_edit_restores_on_exception(lm):
    saved = snapshot(lm)
    with pytest.raises(RuntimeError, match="boom"):
        with rank_one_edit(lm).apply(lm, 2.0):
            raise RuntimeError("boom")
    assert_bit_identical(lm, saved)


def test_weight_edit_adds_exactly_strength_times_delta(lm):
    edit = rank_one_edit(lm)
    name = lm.arch.mlp_out_param(1)
    delta = edit.deltas[name]
    original = dict(lm.model.named_parameters())[name].detach().clone()
    with edit.apply(lm, strength=0.5):
        edited = dict(lm.model.named_parameters())[name].detach().clone()
    torch.testing.assert_close(edited - original, 0.5 * delta.u @ delta.v.T)


def test_activation_edit_removes_every_hook_also_on_exception(lm):
    before = logits(lm)
    edit = steering_edit(lm)
    with edit.apply(lm, 4.0):
        assert not torch.allclose(logits(lm), before)
    assert torch.equal(logits(lm), before)
    with pytest.raises(ValueError):
        with edit.apply(lm, 4.0):
            raise ValueError
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())
    assert torch.equal(logits(lm), before)


def test_activation_edit_at_generated_positions_leaves_the_prompt_alone(lm):
    before = logits(lm)
    with steering_edit(lm, positions="generated").apply(lm, 4.0):
        during = logits(lm)
        with generated_from(torch.tensor([3])):
            from_three = logits(lm)
    # Plain forward: only the last position (which predicts the first generated token) moves.
    assert torch.equal(during[:, :-1], before[:, :-1]) and not torch.allclose(during[:, -1], before[:, -1])
    # Scoring prompt + answer: positions 3.. are generated.
    assert torch.equal(from_three[:, :3], before[:, :3]) and not torch.allclose(from_three[:, 3:], before[:, 3:])


def test_sparse_activation_ops(lm):
    seen = {}
    edits = {
        "add": Intervention("mlp_hidden", 1, torch.tensor([10.0, 20.0]), torch.tensor([0, 5]), op="add", positions="all"),
        "floor": Intervention("mlp_hidden", 1, torch.tensor([3.0, 3.0]), torch.tensor([0, 5]), op="floor", positions="all"),
        "ceil": Intervention("mlp_hidden", 1, torch.tensor([-2.0, -2.0]), torch.tensor([0, 5]), op="ceil", positions="all"),
    }

    def observed():  # registered after the edit's hook, so it sees the edited activation
        handle = lm.arch.mlp_out(1).register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
        logits(lm)
        handle.remove()
        return seen["x"]

    plain = observed()
    results = {}
    for op, item in edits.items():
        with ActivationEdit(method="t", interventions=(item,)).apply(lm, 1.0):
            results[op] = observed()
    torch.testing.assert_close(results["add"][..., [0, 5]], plain[..., [0, 5]] + torch.tensor([10.0, 20.0]))
    assert torch.all(results["floor"][..., [0, 5]] >= 3.0) and torch.all(results["ceil"][..., [0, 5]] <= -2.0)
    untouched = [i for i in range(plain.shape[-1]) if i not in (0, 5)]
    assert torch.equal(results["add"][..., untouched], plain[..., untouched])


def test_scaling_and_strength_multiply(lm):
    edit = steering_edit(lm)
    with edit.apply(lm, 2.0):
        twice = logits(lm)
    with (0.5 * edit).apply(lm, 4.0):
        also_twice = logits(lm)
    torch.testing.assert_close(twice, also_twice)
    with edit.apply(lm, 0.0):
        assert torch.equal(logits(lm), logits(tiny_lm("llama")))


def test_negation_flips_a_steering_vector(lm):
    before = logits(lm)
    with edit_applied(lm, steering_edit(lm), 1.0):
        up = logits(lm) - before
    with edit_applied(lm, -steering_edit(lm), 1.0):
        down = logits(lm) - before
    assert (up * down).sum() < 0


def edit_applied(lm, edit, strength):
    return edit.apply(lm, strength)


def test_composition_applies_all_parts_and_restores(lm):
    saved, before = snapshot(lm), logits(lm)
    weight, steer = rank_one_edit(lm), steering_edit(lm)
    with weight.apply(lm, 1.0), steer.apply(lm, 1.0):
        expected = logits(lm)
    composed = weight + steer
    assert isinstance(composed, ComposedEdit) and len(composed.parts) == 2
    with composed.apply(lm):
        torch.testing.assert_close(logits(lm), expected)
    assert_bit_identical(lm, saved)
    assert torch.equal(logits(lm), before)


def test_two_weight_edits_on_one_parameter_restore_exactly(lm):
    saved = snapshot(lm)
    with (rank_one_edit(lm, seed=1) + rank_one_edit(lm, seed=2)).apply(lm, 3.0):
        pass
    assert_bit_identical(lm, saved)


def test_save_load_round_trip_for_every_kind(lm, tmp_path):
    persona = Persona.parse("extraversion=high")
    edits = {
        "weight": rank_one_edit(lm),
        "activation": steering_edit(lm),
        "context": ContextEdit(method="ike", persona=persona, system="Be lively.", demonstrations=(("q", "a"),)),
    }
    edits["composed"] = ComposedEdit.of(edits["weight"], 0.5 * edits["activation"], weights=[1.0, 2.0])
    for kind, edit in edits.items():
        folder = edit.save(tmp_path / kind)
        loaded = load_edit(folder)
        assert type(loaded) is type(edit) and loaded.kind == kind
        with edit.apply(lm, 1.5):
            expected = logits(lm)
            expected_messages = build_messages(lm, "hi")
        with loaded.apply(lm, 1.5):
            torch.testing.assert_close(logits(lm), expected)
            assert build_messages(lm, "hi") == expected_messages
    meta = json.loads((tmp_path / "weight" / "edit.json").read_text())
    assert meta["method"] == "test" and meta["base_model"]["fingerprint"] == lm.fingerprint and meta["version"]
    assert load_edit(tmp_path / "context").persona == persona


def test_low_rank_factors_are_saved_as_factors(lm, tmp_path):
    edit = rank_one_edit(lm)
    edit.save(tmp_path / "e")
    with safe_open(str(tmp_path / "e" / "tensors.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    name = lm.arch.mlp_out_param(1)
    assert shapes == {f"{name}.u": (32, 1), f"{name}.v": (64, 1)}


def test_saving_is_deterministic(lm, tmp_path):
    edit = rank_one_edit(lm)
    edit.save(tmp_path / "a")
    edit.save(tmp_path / "b")
    for name in ("edit.json", "tensors.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_refuses_another_model_unless_forced(lm):
    other = tiny_lm("llama", seed=1)
    edit = rank_one_edit(lm)
    with pytest.raises(EditError, match="fingerprint"):
        with edit.apply(other):
            pass
    with edit.apply(other, force=True):
        pass


def test_refuses_other_shapes_even_when_forced(lm):
    edit = rank_one_edit(tiny_lm("gpt2"))
    with pytest.raises(EditError):
        with edit.apply(lm, force=True):
            pass
    bad = ActivationEdit(method="t", interventions=(Intervention("residual", 1, torch.ones(7)),))
    with pytest.raises(EditError, match="needs shape"):
        with bad.apply(lm):
            pass


def test_save_never_overwrites_a_foreign_folder(lm, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(EditError, match="refusing to overwrite"):
        steering_edit(lm).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_load_rejects_malformed_folders(tmp_path):
    with pytest.raises(EditError, match="no edit.json"):
        load_edit(tmp_path)
    (tmp_path / "edit.json").write_text("{not json")
    with pytest.raises(EditError, match="not valid JSON"):
        load_edit(tmp_path)


def test_persona_prompt_strength_sets_intensity(lm):
    edit = prompt_edit("extraversion=high")
    with edit.apply(lm, 0.3):
        weak = build_messages(lm, "hi")[0]["content"]
    with edit.apply(lm, -1.0):
        flipped = build_messages(lm, "hi")[0]["content"]
    assert "a bit outgoing" in weak and "reserved" in flipped
    with edit.apply(lm, 0.0):
        assert build_messages(lm, "hi") == [{"role": "user", "content": "hi"}]
    assert lm.context_providers == []


def test_context_edit_reaches_generation(lm):
    plain = generate(lm, ["hello"], max_new_tokens=5)
    demo = ContextEdit(method="ike", system="x " * 20, demonstrations=(("what?", "lively music"),))
    with demo.apply(lm):
        edited = generate(lm, ["hello"], max_new_tokens=5)
    assert plain == generate(lm, ["hello"], max_new_tokens=5)
    assert edited != plain


def test_saved_folders_and_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from personaedit.fileio import atomic_dir, write_json_atomic

    import torch

    from personaedit.edits import Delta, WeightEdit

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "edit") as tmp:
            write_json_atomic(tmp / "edit.json", {"a": 1})
        WeightEdit(method="x", deltas={"a.weight": Delta(dense=torch.ones(2, 2))}).save(tmp_path / "weights")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "edit").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "edit" / "edit.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "weights" / "tensors.safetensors").stat().st_mode) == 0o644
