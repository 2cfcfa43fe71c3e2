import torch

from personaedit.models import generate
from personaedit.models.generation import build_messages, render_chat, stop_token_ids
from tiny import tiny_lm, tiny_tokenizer

PROMPTS = ["hello there", "what do you think of jazz music and lively parties?", "tea", "plans and lists"]


def test_batched_greedy_equals_one_at_a_time():
    lm = tiny_lm("llama")
    batched = generate(lm, PROMPTS, max_new_tokens=8, batch_size=4)
    single = [generate(lm, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(r, str) for r in batched)


def test_order_is_kept_whatever_the_lengths():
    lm = tiny_lm("qwen2")
    forward = generate(lm, PROMPTS, max_new_tokens=6, batch_size=2)
    backward = generate(lm, PROMPTS[::-1], max_new_tokens=6, batch_size=2)
    assert forward == backward[::-1]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    lm = tiny_lm("llama")
    first = generate(lm, PROMPTS, max_new_tokens=10, sample=True, temperature=1.5, seed=3)
    again = generate(lm, PROMPTS, max_new_tokens=10, sample=True, temperature=1.5, seed=3)
    greedy = generate(lm, PROMPTS, max_new_tokens=10)
    assert first == again and first != greedy
    state = torch.random.get_rng_state()
    generate(lm, PROMPTS[:1], max_new_tokens=3, sample=True)
    assert torch.equal(state, torch.random.get_rng_state())  # sampling does not disturb the caller's RNG


def test_chat_template_and_plain_fallback():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text, templated = render_chat(tiny_tokenizer(chat_template=True), messages)
    assert templated and text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nS" in text
    text, templated = render_chat(tiny_tokenizer(chat_template=False), messages)
    assert not templated and text == "System: S\n\nUser: U\n\nAssistant:"


def test_templates_without_a_system_role_get_it_folded_in():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    )
    text, _ = render_chat(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "[user] S\n\nU\n[assistant]"


def test_base_model_without_template_generates():
    lm = tiny_lm("gpt2", chat_template=False)
    replies = generate(lm, PROMPTS, max_new_tokens=5)
    assert len(replies) == 4


def test_system_prompt_and_stop_tokens():
    lm = tiny_lm("llama")
    assert build_messages(lm, "hi", system="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(lm)


def test_generation_stops_at_eos():
    lm = tiny_lm("llama")
    eos = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    def eos_after_two_steps(module, args, out):
        if args[0].shape[1] == 1 and calls.append(1) is None and len(calls) >= 2:
            out[..., eos] += 1000.0
        return out

    calls = []
    handle = lm.arch.lm_head.register_forward_hook(eos_after_two_steps)
    ids_before = lm.tokenizer(generate(lm, ["hello"], max_new_tokens=10)[0])["input_ids"]
    handle.remove()
    unstopped = generate(lm, ["hello"], max_new_tokens=10)
    assert len(ids_before) <= 3 < len(lm.tokenizer(unstopped[0])["input_ids"])


def test_a_prompt_past_learned_positions_is_a_clear_error():
    import pytest

    from personaedit.errors import PersonaEditError
    from personaedit.models import generate
    from tiny import tiny_lm

    lm = tiny_lm("gpt2")  # 512 learned positions: indexing past them crashes (a device-side assert on CUDA)
    with pytest.raises(PersonaEditError, match="exceeds this model's 512 positions"):
        generate(lm, ["word " * 600], max_new_tokens=4)
    assert generate(lm, ["hi"], max_new_tokens=2)


def test_a_model_without_a_chat_template_stops_at_the_next_user_turn(monkeypatch):
    """Base models write the transcript's next "User:" turn themselves; that is not part of the reply."""
    import torch

    from personaedit.models import generate
    from tiny import tiny_lm

    lm = tiny_lm("llama", chat_template=False)
    seen = {}

    def fake_generate(input_ids, **options):
        seen.update(options)
        written = lm.tokenizer("Sure thing.\nUser: and what else?", add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([written] * input_ids.shape[0])], 1)

    monkeypatch.setattr(lm.model, "generate", fake_generate)
    assert generate(lm, ["hi"], max_new_tokens=20) == ["Sure thing."]
    assert seen["stop_strings"] == ["\nUser:"] and seen["tokenizer"] is lm.tokenizer
