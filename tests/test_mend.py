"""MEND: editor training (save, reload, resume), the gradient factors, and the weight edit it produces."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from personaedit.edits import WeightEdit, load_edit
from personaedit.errors import PersonaEditError
from personaedit.models.scoring import mean_answer_logprob
from personaedit.methods import mend
from personaedit.data.external import EDIT_QUESTION
from personaedit.methods.mend_editor import MendEditor, TrainConfig, gradient_factors, load_editor, update_factors
from personaedit.methods.mend_training import edit_examples, train_editor
from personaedit.methods.mend_editor import answer_logprobs_at, answer_nll, answer_sequence
from personaedit.models.hooks import hook_site
from personaedit.persona import Persona
from tiny import tiny_lm

SMALL = TrainConfig(layers=2, rank=8, steps=4, checkpoint_every=2, calibration=4)


def _same_state(a: MendEditor, b: MendEditor) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3"])
def test_gradient_factors_are_the_weight_gradient_at_answer_tokens(family):
    """Σ_t δ_t u_tᵀ equals autograd's gradient of the answer NLL w.r.t. each edited matrix, when only the
    layer's outputs at answer positions pass gradient back (the values are unchanged)."""
    lm = tiny_lm(family)
    pair = (EDIT_QUESTION.format("coffee"), "I love coffee with friends.")
    layers = [1, 2]
    factors = gradient_factors(lm, layers, [pair])
    seq, where = answer_sequence(lm, *pair)
    mask = torch.zeros(1, seq.shape[1], 1)
    mask[0, where] = 1

    def answer_only(x):
        return x * mask + (x * (1 - mask)).detach()

    for l in layers:  # one layer at a time: masking another layer would cut paths through it
        handle = hook_site(lm.arch, "mlp_out", l, answer_only)
        try:
            loss = answer_nll(answer_logprobs_at(lm, seq, where), seq, where)
            (grad,) = torch.autograd.grad(loss, [lm.arch.mlp_out(l).weight])
        finally:
            handle.remove()
        u, d = factors[l]
        assert u.shape[0] == where.stop - where.start
        a, b = lm.arch.mlp_out_factors(l, d.T, u.T)  # Σ_t δ_t u_tᵀ in the parameter's layout
        assert torch.allclose(a @ b.T, grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_train_save_reload_and_edit(tmp_path, family):
    lm = tiny_lm(family)
    editor, summary = train_editor(lm, tmp_path / "editor", SMALL)
    assert summary["steps"] == 4 and summary["resumed_from"] == 0 and summary["layers"] == [1, 2]
    reloaded = load_editor(tmp_path / "editor", lm)
    assert _same_state(editor, reloaded)
    assert not (tmp_path / "editor" / "checkpoint").exists()  # a finished run leaves only the editor

    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edit = mend.fit(lm, Persona.parse("extraversion=high"), topic="coffee", editor=str(tmp_path / "editor"))
    assert isinstance(edit, WeightEdit)
    assert set(edit.deltas) == {lm.arch.mlp_out_param(l) for l in (1, 2)}
    with edit.apply(lm):
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert sorted(changed) == sorted(edit.deltas)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    edit.save(tmp_path / "edit")
    again = load_edit(tmp_path / "edit")
    assert all(torch.equal(again.deltas[k].u, d.u) and torch.equal(again.deltas[k].v, d.v) for k, d in edit.deltas.items())


def test_untrained_editor_is_a_gradient_step_that_lowers_the_nll(tmp_path):
    lm = tiny_lm("llama")
    config = TrainConfig(layers=2, rank=8, steps=1, calibration=4, init_step=0.05)
    editor, _ = train_editor(lm, tmp_path / "e", config)
    editor.editors["1"].up.weight.data.zero_()  # back to the identity map
    editor.editors["2"].up.weight.data.zero_()
    editor.editors["1"].up.bias.data.zero_()
    editor.editors["2"].up.bias.data.zero_()
    editor.save(tmp_path / "e")
    question, text = EDIT_QUESTION.format("coffee"), "Coffee is best shared with a crowd of friends."
    factors = gradient_factors(lm, [1, 2], [(question, text)])
    update = update_factors(load_editor(tmp_path / "e", lm), factors)
    for l in (1, 2):
        step = editor.step_sizes()[l]
        assert torch.allclose(update[l][1].T @ update[l][0], -step * (factors[l][1].T @ factors[l][0]), atol=1e-6)
    edit = mend.fit(lm, Persona.parse("extraversion=high"), topic="coffee", text=text, editor=str(tmp_path / "e"))
    base = mean_answer_logprob(lm, [question], [text])[0]
    with edit.apply(lm):
        edited = mean_answer_logprob(lm, [question], [text])[0]
    assert edited > base


def test_resume_continues_where_the_checkpoint_left_off(tmp_path):
    lm = tiny_lm("llama")
    straight, _ = train_editor(lm, tmp_path / "straight", SMALL)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_editor(lm, tmp_path / "resumed", SMALL, on_progress=stop_after_three)
    assert (tmp_path / "resumed" / "checkpoint" / "editor.json").is_file()
    resumed, summary = train_editor(lm, tmp_path / "resumed", SMALL)
    assert summary["resumed_from"] == 2
    assert _same_state(straight, resumed)  # the same steps in the same order, the same Adam state


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(KeyboardInterrupt):
        train_editor(lm, tmp_path / "e", SMALL, on_progress=lambda d, t: (_ for _ in ()).throw(KeyboardInterrupt) if d == 3 else None)
    with pytest.raises(PersonaEditError, match="other settings"):
        train_editor(lm, tmp_path / "e", TrainConfig(layers=2, rank=16, steps=4, calibration=4))


def test_editor_of_another_model_and_bad_requests_are_refused(tmp_path):
    lm = tiny_lm("llama")
    train_editor(lm, tmp_path / "e", TrainConfig(layers=1, rank=4, steps=1, calibration=2))
    other = tiny_lm("llama", seed=1)
    with pytest.raises(PersonaEditError, match="fingerprint"):
        mend.fit(other, Persona.parse("extraversion=high"), topic="coffee", editor=str(tmp_path / "e"))
    with pytest.raises(PersonaEditError, match="--topic"):
        mend.fit(lm, Persona.parse("extraversion=high"), topic="", editor=str(tmp_path / "e"))
    with pytest.raises(PersonaEditError, match="Big Five"):
        mend.fit(lm, Persona.parse("tf=T"), topic="coffee", editor=str(tmp_path / "e"))
    with pytest.raises(PersonaEditError, match="mend train"):
        mend.fit(lm, Persona.parse("extraversion=high"), topic="coffee", editor=str(tmp_path / "none"))


def test_edit_examples_from_a_personality_edit_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"ent": "tea", "extraversion": ["I pour tea for everyone!"], "neuroticism": ["Tea worries me."]},'
                    ' {"ent": "jazz", "agreeableness": ["Jazz brings people together kindly."]}]', encoding="utf-8")
    examples = edit_examples(data=path)
    assert {(e.topic, e.trait) for e in examples} == {("tea", "extraversion"), ("tea", "neuroticism"), ("jazz", "agreeableness")}
    assert len(edit_examples("train")) == 440  # 44 training topics x 10 poles


def test_cli_trains_an_editor_and_edits_with_it(tmp_path, capsys):
    from clirun import run_cli
    from test_loading import save_tiny

    def run(args):
        code, out, err = run_cli(args, capsys)
        return code, SimpleNamespace(out=out, err=err)

    model = str(save_tiny(tmp_path / "tiny-model"))
    code, out = run(["mend", "train", "--model", model, "--out", str(tmp_path / "editor"), "--steps", "2",
                     "--layers", "1", "--rank", "4"])
    assert code == 0 and json.loads(out.out)["steps"] == 2
    code, out = run(["edit", "mend", "--model", model, "--persona", "neuroticism=high", "--out", str(tmp_path / "e")])
    assert code == 2 and "--topic" in out.err  # the topic is required
    code, out = run(["edit", "mend", "--model", model, "--persona", "neuroticism=high", "--topic", "chess",
                     "--editor", str(tmp_path / "editor"), "--out", str(tmp_path / "e")])
    assert code == 0 and "saved weight edit" in out.err
    assert isinstance(load_edit(tmp_path / "e"), WeightEdit)
