import pytest
import torch

from personaedit.errors import UnsupportedArchitectureError
from personaedit.models.arch import Architecture, is_transposed_linear
from personaedit.models.hooks import hook_site
from personaedit.methods import fit_edit
from personaedit.models import generate
from personaedit.models.forward import encode_prompts, position_ids
from tiny import FAMILIES, MLP_4X, tiny_hf_model, tiny_lm


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exposes_its_parts(family):
    lm = tiny_lm(family)
    arch = lm.arch
    assert arch.num_layers == 3
    assert arch.hidden_size == 32
    assert arch.mlp_size == (128 if family in MLP_4X else 64)
    assert arch.lm_head.weight.shape == (384, 32)
    params = dict(lm.model.named_parameters())
    for i in range(arch.num_layers):
        assert arch.mlp_out_param(i) in params
        assert params[arch.mlp_out_param(i)] is arch.mlp_out(i).weight
        assert arch.mlp_out_weight(i).shape == (arch.hidden_size, arch.mlp_size)
        assert arch.attention(i) is not None and arch.mlp_in(i)


@pytest.mark.parametrize("family", FAMILIES)
def test_down_proj_weight_maps_mlp_hidden_to_output(family):
    """W (as [out, in]) times the captured down_proj input reproduces its output, for every layout."""
    lm = tiny_lm(family)
    arch = lm.arch
    seen = {}
    module = arch.mlp_out(1)
    # clone: falcon adds the attention output in place into this tensor after the MLP returns
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].clone(), y=out.clone()))
    with torch.no_grad():
        lm.model(torch.randint(3, 300, (2, 5)))
    handle.remove()
    bias = getattr(module, "bias", None)
    expected = seen["x"] @ arch.mlp_out_weight(1).T + (bias if bias is not None else 0)
    torch.testing.assert_close(seen["y"], expected, rtol=1e-4, atol=1e-5)
    assert is_transposed_linear(module) == (family == "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("point", ["residual", "mlp_hidden", "mlp_out", "attn_out"])
def test_hooks_at_every_site_see_and_change_activations(family, point):
    lm = tiny_lm(family)
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        before = lm.model(ids).logits
    shapes = []
    handle = hook_site(lm.arch, point, 1, lambda h: (shapes.append(tuple(h.shape)), h + 1.0)[1])
    with torch.no_grad():
        changed = lm.model(ids).logits
    handle.remove()
    with torch.no_grad():
        after = lm.model(ids).logits
    assert shapes == [(2, 6, lm.arch.site_width(point))]
    assert not torch.allclose(before, changed)
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_as_one_prompt_at_a_time(family):
    """Every family's attention (rotary, learned positions, ALiBi) copes with left padding, also under
    a steering edit on generated positions (what `generate --edit` does)."""
    lm = tiny_lm(family, chat_template=False)
    prompts = ["hello there", "what do you think of jazz music and lively parties?", "tea"]

    def last_logits(texts):
        batch = encode_prompts(lm, texts, add_special_tokens=True)
        with torch.no_grad():
            return lm.model(**batch, position_ids=position_ids(batch["attention_mask"])).logits[:, -1]

    batched = last_logits(prompts)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batched[i], last_logits([prompt])[0], rtol=1e-4, atol=1e-4)
    replies = generate(lm, prompts, max_new_tokens=6, batch_size=3)
    assert replies == [generate(lm, [p], max_new_tokens=6)[0] for p in prompts]
    edit = fit_edit("steer", lm, "extraversion=high", layer="1", scale=50.0, pairs=4, batch_size=4)
    with edit.apply(lm):
        assert not torch.allclose(last_logits(prompts), batched)
        steered = generate(lm, prompts, max_new_tokens=6, batch_size=3)
        assert steered == [generate(lm, [p], max_new_tokens=6)[0] for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_out_and_attn_out_sites_are_what_each_adds_to_the_residual(family):
    """Hooked with the MLP's / attention's contribution, not the residual stream (BLOOM, MPT, OPT)."""
    lm = tiny_lm(family)
    seen = {}
    handles = [hook_site(lm.arch, p, 1, lambda h, p=p: seen.__setitem__(p, h.clone())) for p in ("mlp_out", "residual")]
    with torch.no_grad():
        lm.model(torch.randint(3, 300, (1, 5)))
    for h in handles:
        h.remove()
    # A site that returned residual + MLP (BLOOM's and MPT's MLP modules, OPT's layer) would equal
    # the layer's output here.
    assert not torch.allclose(seen["mlp_out"], seen["residual"], atol=1e-3)


def test_unknown_layout_is_refused_with_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedArchitectureError, match="layout personaedit does not know"):
        Architecture(model)


def test_unlisted_model_type_with_a_known_layout_is_accepted():
    model = tiny_hf_model("llama")
    model.config.model_type = "somebody-new"
    arch = Architecture(model)
    assert arch.layout.name == "llama-like" and arch.num_layers == 3


def test_layer_index_out_of_range():
    lm = tiny_lm("llama")
    with pytest.raises(UnsupportedArchitectureError, match="out of range"):
        lm.arch.layer(7)
    assert lm.arch.layer(-1) is lm.arch.layers[2]
