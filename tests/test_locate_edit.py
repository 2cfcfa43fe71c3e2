import pytest
import torch

from personaedit.cli import main
from personaedit.data import records
from personaedit.edits import WeightEdit, load_edit
from personaedit.errors import PersonaEditError
from personaedit.methods import all_methods, fit_edit
from personaedit.methods import locate, rank_one, second_moment, value
from personaedit.methods.locate import Request, efficacy, tokenise_request
from personaedit.methods.value import ValueOptions
from personaedit.methods.palette import persona_requests
from personaedit.persona import Persona
from test_loading import save_tiny
from tiny import tiny_lm

# Tiny random models have small activations and near-flat logits: a gentle lr, no KL, and a clamp that
# does not bind let the value optimisation reach the target. The subject ends the prompt, so δ acts
# directly at the predicting position (their attention barely carries anything upwards).
TINY = dict(layer=1, steps=40, lr=0.05, kl_factor=0.0, clamp=1e4, prefixes=4, prefix_length=5)
PROMPT, SUBJECT, TARGET = "I love meeting new people at {}", "parties", " tea"


def test_request_locates_the_subject_and_rejects_a_prompt_without_it():
    assert Request.of("Today {} feel", "I", "calm") == Request("Today {} feel", "I", " calm")
    assert Request.of("Today I feel", "I", " calm").template == "Today {} feel"
    assert Request.of("In my view I feel", "I", "calm").template == "In my view {} feel"  # whole words only
    with pytest.raises(PersonaEditError, match="does not occur in the prompt"):
        Request.of("Today you feel", "I", "calm")
    with pytest.raises(PersonaEditError, match="does not occur"):
        Request.of("Idle days", "I", "calm")
    with pytest.raises(PersonaEditError, match="exactly one"):
        Request.of("{} and {}", "I", "x")
    with pytest.raises(PersonaEditError, match="target is empty"):
        Request.of("{} am", "I", " ")


def test_contexts_split_at_the_subject_and_share_the_rest(lm):
    request = Request.of(PROMPT, SUBJECT, TARGET)
    contexts = tokenise_request(lm, request, ["The cat sat", "You know"], token="last")
    tokenizer = lm.tokenizer
    assert len(contexts.before) == 3
    for before, prefix in zip(contexts.before, ["", "The cat sat. ", "You know. "]):
        assert before + contexts.after == tokenizer(prefix + request.prompt)["input_ids"]
    subject_ids = tokenizer(" " + SUBJECT, add_special_tokens=False)["input_ids"]
    assert contexts.after[:len(subject_ids)] == subject_ids
    assert contexts.subject_index == len(subject_ids) - 1
    assert tokenise_request(lm, request, [], token="first").subject_index == 0
    with pytest.raises(PersonaEditError, match="'first' or 'last'"):
        tokenise_request(lm, request, [], token="middle")


def test_random_prefixes_are_model_written_and_seeded(lm):
    first = locate.random_prefixes(lm, 5, 4, seed=3)
    assert len(first) == 5 and first == locate.random_prefixes(lm, 5, 4, seed=3)
    assert all("{" not in p and "\n" not in p for p in first)
    assert first[0].startswith("The")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3", "gemma2", "phi3",
                                    "starcoder2", "phi", "falcon", "mpt", "bloom", "opt"])
def test_rome_makes_the_target_the_greedy_continuation(family, tmp_path):
    lm = tiny_lm(family)
    request = Request.of(PROMPT, SUBJECT, TARGET)
    assert efficacy(lm, [request]) == [False]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edit = fit_edit("rome", lm, "tf=T", prompt=PROMPT, subject=SUBJECT, target=TARGET, **TINY)
    assert isinstance(edit, WeightEdit)
    (name, delta), = edit.deltas.items()
    assert name == lm.arch.mlp_out_param(1) and delta.rank == 1  # factors, not a dense matrix
    assert edit.options["fitted"]["nll"] < edit.options["fitted"]["nll_start"]
    with edit.apply(lm):
        assert efficacy(lm, [request]) == [True]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    again = load_edit(edit.save(tmp_path / "rome"))
    with again.apply(lm):
        assert efficacy(lm, [request]) == [True]


def test_rome_update_maps_the_averaged_key_to_its_value(lm):
    """ΔW k* = δ: the key the update uses is the one the value was optimised at (r-ROME)."""
    request = Request.of(PROMPT, SUBJECT, TARGET)
    prefixes = locate.random_prefixes(lm, 3, 4)
    options = ValueOptions(steps=5, lr=0.05, kl_factor=0.0, clamp=1e4)
    update = rank_one.edit_request(lm, request, 1, prefixes, options)
    contexts = tokenise_request(lm, request, prefixes)
    key, output = value.keys_and_outputs(lm, contexts, 1, ("mlp_out", 1))
    delta_w = update.u[:, None] @ update.v[None, :]
    moved = delta_w @ key
    assert torch.allclose(moved.norm(), torch.tensor(update.info["delta_norm"]), rtol=1e-4)
    assert torch.allclose(output.norm(), torch.tensor(update.info["value_norm"]), rtol=1e-4)


def test_rome_needs_prompt_and_target(lm):
    with pytest.raises(PersonaEditError, match="needs --prompt"):
        fit_edit("rome", lm, "tf=T", target="x")
    with pytest.raises(PersonaEditError, match="does not occur"):
        fit_edit("rome", lm, "tf=T", prompt="nothing here", subject="I", target="x")
    with pytest.raises(PersonaEditError, match="out of range"):
        fit_edit("rome", lm, "tf=T", prompt=PROMPT, subject=SUBJECT, target=TARGET, layer=7)


def test_rome_with_covariance_adjustment_still_hits_the_target(lm):
    request = Request.of(PROMPT, SUBJECT, TARGET)
    edit = fit_edit("rome", lm, "tf=T", prompt=PROMPT, subject=SUBJECT, target=TARGET, covariance=True,
                    samples=400, **TINY)
    with edit.apply(lm):
        assert efficacy(lm, [request]) == [True]


def test_palette_uses_the_poles_queries_in_order_and_the_opposite_pole_for_negative_levels():
    chosen = persona_requests(Persona.parse("tf=T,extraversion=-0.5"), 4)
    ids = [query_id for _, _, query_id in chosen]
    assert ids == [f"tf-T-0{i}" for i in range(1, 5)] + [f"extraversion-low-0{i}" for i in range(1, 5)]
    assert [scale for _, scale, _ in chosen] == [1.0] * 4 + [0.5] * 4
    rows = records("palette_queries", dimension="tf", pole="T")
    assert chosen[0][0].prompt == rows[0]["template"].replace("{}", rows[0]["subject"])
    for pole in {(r["dimension"], r["pole"]) for r in records("palette_queries")}:
        assert len(records("palette_queries", dimension=pole[0], pole=pole[1])) >= 12
    with pytest.raises(PersonaEditError, match="between 1 and 16"):
        persona_requests(Persona.parse("tf=T"), 17)
    with pytest.raises(PersonaEditError, match="every level to 0"):
        persona_requests(Persona.parse("tf=0"), 4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_palette_applies_queries_sequentially_as_rank_one_factors(family, tmp_path):
    lm = tiny_lm(family)
    progress = []
    options = {k: v for k, v in TINY.items() if k != "layer"} | {"steps": 3}
    edit = fit_edit("palette", lm, Persona.parse("jp=P"), queries=3, layer=1,
                    on_progress=lambda d, t: progress.append((d, t)), **options)
    (name, delta), = edit.deltas.items()
    assert name == lm.arch.mlp_out_param(1) and delta.rank == 3
    assert list(edit.options["fitted"]) == ["jp-P-01", "jp-P-02", "jp-P-03"] and progress[-1] == (3, 3)
    assert load_edit(edit.save(tmp_path / "palette")).deltas[name].rank == 3
    # Sequential: the first query's update is the same whether or not more queries follow.
    one = fit_edit("palette", lm, "jp=P", queries=1, layer=1, **options)
    assert torch.allclose(one.deltas[name].u[:, 0], delta.u[:, 0]) and torch.allclose(one.deltas[name].v[:, 0], delta.v[:, 0])


def test_palette_protect_keeps_each_update_off_the_earlier_keys(lm):
    options = {k: v for k, v in TINY.items() if k != "layer"} | {"steps": 3}
    edit = fit_edit("palette", lm, "tf=F", queries=3, layer=1, protect=True, **options)
    (delta,) = edit.deltas.values()
    gram = delta.v.T @ delta.v  # each v is orthogonal to the earlier keys, hence to the earlier v's
    off_diagonal = gram - torch.diag(gram.diagonal())
    assert off_diagonal.abs().max() < 1e-4 * gram.diagonal().max()


def test_default_layer_follows_depth():
    assert locate.default_layer(30) == 16 and locate.default_layer(28) == 15 and locate.default_layer(3) == 2


def test_second_moments_match_a_direct_computation_and_are_cached(lm, monkeypatch):
    moments = second_moment.second_moments(lm, [0, 2], samples=300, batch_size=4)
    assert set(moments) == {0, 2} and moments[0].dtype == torch.float64 and moments[0].shape == (64, 64)
    assert torch.allclose(moments[0], moments[0].T) and torch.linalg.eigvalsh(moments[0]).min() > -1e-9

    # Direct: the first 300 corpus tokens, one text at a time.
    keys, left = [], 300
    handle = lm.arch.mlp_out(0).register_forward_pre_hook(lambda _m, args: keys.append(args[0][0].double()))
    for text in second_moment.corpus():
        ids = lm.tokenizer(text)["input_ids"][:min(left, second_moment.MAX_TOKENS_PER_TEXT)]
        if not ids:
            break
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
        left -= len(ids)
    handle.remove()
    stacked = torch.cat(keys)[:300]
    assert torch.allclose(moments[0], stacked.T @ stacked / 300, atol=1e-6)

    for layer in (0, 2):
        assert second_moment.cache_path(lm, layer, 300).is_file()
    monkeypatch.setattr(second_moment, "corpus", lambda: pytest.fail("statistics recomputed instead of read from the cache"))
    again = second_moment.second_moments(lm, [2, 0], samples=300)
    assert torch.equal(again[0], moments[0]) and torch.equal(again[2], moments[2])
    monkeypatch.undo()
    with pytest.raises(PersonaEditError, match="at most"):
        second_moment.second_moments(lm, [1], samples=10**9)


def test_memit_spreads_one_batch_over_layers(tmp_path):
    lm = tiny_lm("qwen2")
    options = {k: v for k, v in TINY.items() if k != "layer"} | {"steps": 3}
    edit = fit_edit("memit", lm, "ei=E", queries=2, layers="0-2", samples=300, mom2_weight=10.0, **options)
    assert sorted(edit.deltas) == sorted(lm.arch.mlp_out_param(i) for i in range(3))
    assert all(d.rank == 2 for d in edit.deltas.values())
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with edit.apply(lm):
        assert any(not torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    with pytest.raises(PersonaEditError, match="out of range"):
        fit_edit("memit", lm, "ei=E", layers="5")


def test_registered_and_on_the_command_line(tmp_path, capsys):
    assert {"rome", "palette", "memit"} <= set(all_methods())
    model_dir = str(save_tiny(tmp_path / "tiny-model"))
    out = tmp_path / "rome-edit"
    args = ["edit", "rome", "--model", model_dir, "--persona", "tf=T", "--out", str(out), "--prompt", PROMPT,
            "--subject", SUBJECT, "--target", "tea", "--layer", "1", "--steps", "2", "--prefixes", "2"]
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    assert code == 0 and (out / "edit.json").is_file()
    assert load_edit(out).options["target"] == " tea"
    try:
        main(["edit", "rome", "--model", model_dir, "--persona", "tf=T", "--out", str(tmp_path / "x"),
              "--prompt", "no subject here", "--target", "tea"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "does not occur in the prompt" in err


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_value_passes_share_the_replayed_layers_cache_and_give_the_same_delta(family, monkeypatch):
    """Each optimisation pass copies only the cache layers it appends to (issue 18: the copy of the whole
    prefix cache per pass was r-ROME's largest allocation); δ and the key are those of a full copy."""
    import copy

    lm = tiny_lm(family)
    request = Request.of(PROMPT, SUBJECT, TARGET)
    tokens = tokenise_request(lm, request, locate.random_prefixes(lm, 3, 4))
    options = ValueOptions(steps=6, lr=0.05, kl_factor=0.1, clamp=1e4)
    replay = value._PrefixReplay(lm, tokens, replay_below=2)
    first = replay._copy_of_cache()  # before the recording pass every layer runs: all copied
    assert all(a is not b for a, b in zip(first.layers, replay.cache.layers))
    replay()
    shared = replay._copy_of_cache()
    assert [a is b for a, b in zip(shared.layers, replay.cache.layers)] == [True, True, False]
    ours = value.optimise_delta(lm, request, tokens, ("mlp_out", 2), options, key_layer=2)
    monkeypatch.setattr(value._PrefixReplay, "_copy_of_cache", lambda self: copy.deepcopy(self.cache))
    full = value.optimise_delta(lm, request, tokens, ("mlp_out", 2), options, key_layer=2)
    assert ours.info == full.info and torch.equal(ours.delta, full.delta) and torch.equal(ours.key, full.key)
