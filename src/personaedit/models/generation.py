"""Batched chat generation: chat template (or a plain fallback), left padding, greedy or seeded sampling."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Sequence

import torch

from personaedit.errors import PersonaEditError
from personaedit.models.forward import encode_prompts, ensure_pad_token
from personaedit.models.loading import LoadedModel
from personaedit.progress import Progress

# End-of-turn markers of common chat templates; used as extra stop tokens when the vocabulary has them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# What opens the next user turn in the plain transcript `render_chat` writes for a tokenizer without a template.
TRANSCRIPT_TURN = "\nUser:"


@dataclass(frozen=True)
class Context:
    """What context edits put around a user message: a system prompt and demonstration turns.

    When `topics` names each demonstration's topic, demonstrations about a topic the message mentions
    are left out, and at most `k` are used (IKE draws its demonstrations from other topics)."""

    system: str | None = None
    demonstrations: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    topics: tuple[str, ...] = ()
    k: int | None = None

    def for_message(self, prompt: str) -> "Context":
        if not self.topics and self.k is None:
            return self
        text = prompt.lower()
        kept = [d for i, d in enumerate(self.demonstrations)
                if i >= len(self.topics) or not self.topics[i] or self.topics[i].lower() not in text]
        return Context(self.system, tuple(kept[: self.k]))


def build_messages(lm: LoadedModel, prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation for `prompt` under the context edits in force on `lm` and an optional system prompt."""
    contexts = [edit.context_for(prompt) for edit in lm.context_providers]
    systems = [c.system for c in contexts if c.system] + ([system] if system else [])
    messages: list[dict[str, str]] = []
    if systems:
        messages.append({"role": "system", "content": "\n\n".join(systems)})
    for context in contexts:
        for question, answer in context.demonstrations:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": prompt})
    return messages


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(text, uses_template). Templates that reject a system role get it folded into the first user turn;
    tokenizers without a template get a plain 'System/User/Assistant' transcript."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
        except Exception:  # noqa: BLE001 - jinja raises its own error types for unsupported roles
            if messages and messages[0]["role"] == "system":
                system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
                rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
                return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True), True
            raise
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:", False


def stop_token_ids(lm: LoadedModel) -> list[int]:
    ids: set[int] = set()
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    vocab = lm.tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return sorted(ids)


def _check_context(lm: LoadedModel, prompt_tokens: int, new_tokens: int) -> None:
    """Models with learned absolute positions (GPT-2's `n_positions`) index past their table and crash (a
    device-side assert on CUDA); refuse with a clear message instead. Rotary models only degrade."""
    limit = getattr(lm.model.config, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise PersonaEditError(f"a prompt of {prompt_tokens} tokens plus {new_tokens} new tokens exceeds this model's "
                               f"{limit} positions; use a shorter context (fewer demonstrations, a shorter system "
                               "prompt) or fewer new tokens")


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
    repetition_penalty: float | None = None,
    on_batch: Progress | None = None,
) -> list[str]:
    """Replies to `prompts` (one user turn each), in order. Greedy unless `sample`; sampling is seeded.
    `repetition_penalty` (CTRL's, as in transformers) is off unless given."""
    rendered = [render_chat(lm.tokenizer, build_messages(lm, p, system)) for p in prompts]
    lengths = [len(ids) for ids in lm.tokenizer([text for text, _ in rendered], add_special_tokens=False)["input_ids"]]
    _check_context(lm, max(lengths, default=0), max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # similar lengths pad less
    replies: list[str] = [""] * len(prompts)
    stops = stop_token_ids(lm)
    options: dict[str, object] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                                  "eos_token_id": stops, "pad_token_id": ensure_pad_token(lm.tokenizer)}
    if repetition_penalty is not None:
        options["repetition_penalty"] = repetition_penalty
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        uses_template = rendered[chunk[0]][1]
        batch = encode_prompts(lm, [rendered[i][0] for i in chunk], add_special_tokens=not uses_template)
        # In the plain transcript a model without a chat template (a base model) goes on to write the next
        # "User:" turn itself: that ends its reply.
        turn_end = {} if uses_template else {"stop_strings": [TRANSCRIPT_TURN], "tokenizer": lm.tokenizer}
        with torch.no_grad(), torch.random.fork_rng(devices=[]) if sample else contextlib.nullcontext():
            if sample:
                torch.manual_seed(seed + start)
            output = lm.model.generate(**batch, **options, **turn_end)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for row, index in enumerate(chunk):
            reply = lm.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            replies[index] = (reply if uses_template else reply.split(TRANSCRIPT_TURN)[0]).strip()
        done += len(chunk)
        if on_batch:
            on_batch(done, len(prompts))
    return replies

