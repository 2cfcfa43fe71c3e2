"""Per-row edits and batched decoding for the server: a row sees only its own edit, the same alone or mixed."""

import pytest
import torch

from personaedit.edits import ActivationEdit, ComposedEdit, ContextEdit, Delta, Intervention, WeightEdit
from personaedit.errors import EditError
from personaedit.models import generate
from personaedit.models.generation import build_messages, render_chat
from personaedit.serve.decode import RowRequest, _held_back, generate_rows
from personaedit.serve.rowwise import PreparedEdit, conversation, row_edits
from tiny import tiny_lm


def _param_name(lm, param):
    return next(name for name, p in lm.model.named_parameters() if p is param)


def served_edits(lm):
    """Named edits of every kind the server applies per row, strong enough to change a tiny model's replies."""
    generator = torch.Generator().manual_seed(1)
    hidden = lm.arch.hidden_size
    params = dict(lm.model.named_parameters())
    down = lm.arch.mlp_out_param(1)
    out_size, in_size = params[down].shape
    up = _param_name(lm, lm.arch.mlp_in(2)[0].weight)
    steer = ActivationEdit("steer", interventions=(Intervention("residual", 1, torch.randn(hidden, generator=generator) * 3),))
    low_rank = WeightEdit("rome", deltas={down: Delta(u=torch.randn(out_size, 2, generator=generator),
                                                       v=torch.randn(in_size, 2, generator=generator) * 0.5)})
    dense = WeightEdit("vector", deltas={up: Delta(dense=torch.randn(params[up].shape, generator=generator) * 0.3)})
    context = ContextEdit("custom", system="You are lively and talkative.",
                          demonstrations=(("How are you?", "Wonderful, thanks for asking!"),))
    floor = ActivationEdit("npti", interventions=(
        Intervention("mlp_hidden", 0, torch.full((4,), 2.0), indices=torch.tensor([1, 5, 9, 30]), op="floor"),))
    composed = ComposedEdit.of(floor, low_rank, weights=[1.0, -0.7])
    return {"steer": steer, "low_rank": low_rank, "dense": dense, "context": context, "composed": composed}


def _prompt_ids(lm, prompt, prepared=None, strength=1.0):
    contexts = prepared.context_entries(strength) if prepared else []
    text, uses_template = render_chat(lm.tokenizer, conversation([{"role": "user", "content": prompt}], contexts))
    return lm.tokenizer(text, add_special_tokens=not uses_template)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_edit_matches_applying_the_edit_to_the_whole_model(family):
    lm = tiny_lm(family)
    ids = torch.tensor([_prompt_ids(lm, "What do you like?")])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        for name, edit in served_edits(lm).items():
            if name == "context":
                continue
            with edit.apply(lm, strength=0.8):
                whole = lm.model(input_ids=ids).logits
            with row_edits(lm, [(PreparedEdit.of(lm, edit), 0.8)]):
                per_row = lm.model(input_ids=ids).logits
            assert not torch.allclose(whole, plain, atol=1e-3), name  # the edit does something
            if name == "steer":
                assert torch.equal(per_row, whole)  # the same hook body: bit for bit
            else:
                torch.testing.assert_close(per_row, whole, atol=2e-4, rtol=1e-4, msg=name)


def test_rows_without_the_edit_are_untouched_bit_for_bit(lm):
    ids = torch.tensor([_prompt_ids(lm, "Plans for tonight?")] * 3)
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        for edit in served_edits(lm).values():
            prepared = PreparedEdit.of(lm, edit)
            with row_edits(lm, [None, (prepared, 1.0), None]):
                mixed = lm.model(input_ids=ids).logits
            assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())  # hooks gone


def test_tied_embedding_delta_reaches_input_and_output_matrices():
    lm = tiny_lm("gpt2")  # GPT-2 ties its token embeddings to the LM head
    weight = lm.model.get_input_embeddings().weight
    assert lm.model.get_output_embeddings().weight is weight
    edit = WeightEdit("vector", deltas={_param_name(lm, weight): Delta(dense=torch.randn(weight.shape) * 0.05)})
    ids = torch.tensor([_prompt_ids(lm, "Hello")])
    with torch.no_grad():
        with edit.apply(lm):
            whole = lm.model(input_ids=ids).logits
        with row_edits(lm, [(PreparedEdit.of(lm, edit), 1.0)]):
            per_row = lm.model(input_ids=ids).logits
    torch.testing.assert_close(per_row, whole, atol=2e-4, rtol=1e-4)


def test_parameters_that_cannot_act_per_row_are_refused(lm):
    norm = _param_name(lm, lm.arch.final_norm.weight)
    edit = WeightEdit("vector", deltas={norm: Delta(dense=torch.ones(lm.arch.hidden_size))})
    with pytest.raises(EditError, match="cannot be applied per request"):
        PreparedEdit.of(lm, edit)


def test_context_rows_render_the_conversation_generate_would(lm):
    edit = served_edits(lm)["context"]
    with edit.apply(lm):
        expected = build_messages(lm, "Plans?", system="Be brief.")
    got = conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plans?"}],
                       PreparedEdit.of(lm, edit).context_entries(1.0))
    assert got == expected
    assert PreparedEdit.of(lm, edit).context_entries(0.0) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_output_is_the_same_alone_or_in_a_mixed_batch(family):
    lm = tiny_lm(family)
    edits = served_edits(lm)
    prompts = ["What do you like?", "Plans for tonight?", "Tell me about jazz music.", "Hi", "The weather today?",
               "Do you like parties?"]
    assignments = [None] + [(PreparedEdit.of(lm, edit), 1.0) for edit in edits.values()]

    def request(prompt, assigned):
        return RowRequest(_prompt_ids(lm, prompt, *(assigned or ())), max_tokens=10, edit=assigned)

    mixed = generate_rows(lm, [request(p, a) for p, a in zip(prompts, assignments)])
    alone = [generate_rows(lm, [request(p, a)])[0] for p, a in zip(prompts, assignments)]
    assert [(o.token_ids, o.text, o.finish_reason) for o in mixed] == [(o.token_ids, o.text, o.finish_reason) for o in alone]
    # every edit changes its row: without it the same prompt gives another reply (the tiny GPT-2 repeats one
    # token whatever its conversation, so there only the edits acting inside the model can show)
    for name, prompt, assigned, outcome in zip(edits, prompts[1:], assignments[1:], mixed[1:]):
        if not (family == "gpt2" and name == "context"):
            assert generate_rows(lm, [request(prompt, None)])[0].token_ids != outcome.token_ids, name
    # and the plain row is what `generate` gives
    assert mixed[0].text == generate(lm, [prompts[0]], max_new_tokens=10)[0]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(lm):
    ids = _prompt_ids(lm, "Tell me a story")

    def sampled(seed):
        return RowRequest(ids, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)

    alone = generate_rows(lm, [sampled(3)])[0].text
    batch = generate_rows(lm, [RowRequest(_prompt_ids(lm, "Hi"), max_tokens=5), sampled(3), sampled(4)])
    assert batch[1].text == alone
    assert generate_rows(lm, [sampled(3)])[0].text == alone


def test_stop_strings_end_a_row_and_are_never_streamed(lm):
    ids = _prompt_ids(lm, "What do you like?")
    full = generate_rows(lm, [RowRequest(ids, max_tokens=16)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 16 and len(full.text) > 6
    stop = full.text[4:6]
    deltas = []
    cut = generate_rows(lm, [RowRequest(ids, max_tokens=16, stop=(stop,), on_delta=deltas.append)])[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.finish_reason == "stop" and "".join(deltas) == cut.text


def test_held_back_text_covers_stop_prefixes_and_split_characters():
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz",)) == 0
    assert _held_back("caf\ufffd", ()) == 1
