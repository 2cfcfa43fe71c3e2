"""Tiny random-weight models of every supported family and a tokenizer, built in-process (no files, no hub)."""

from __future__ import annotations

import functools

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from personaedit.models import LoadedModel, wrap_model

VOCAB = 384
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "I love meeting new people at parties and talking all night.",
    "I prefer a quiet evening at home with a book and some tea.",
    "What do you think of jazz music? It is relaxing and lively.",
    "Plans, lists and schedules keep my week in order.",
    "The weather today is calm and the sea is blue.",
] * 20

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **_IDS)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_DECODER),
    "mistral": lambda: T.MistralConfig(**_DECODER),
    "qwen2": lambda: T.Qwen2Config(**_DECODER),
    "qwen3": lambda: T.Qwen3Config(**_DECODER, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**_DECODER, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_DECODER, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_DECODER, head_dim=8),
    "phi3": lambda: T.Phi3Config(**_DECODER),
    "olmo": lambda: T.OlmoConfig(**_DECODER),
    "olmo2": lambda: T.Olmo2Config(**_DECODER),
    "granite": lambda: T.GraniteConfig(**_DECODER),
    "stablelm": lambda: T.StableLmConfig(**_DECODER),
    "cohere": lambda: T.CohereConfig(**_DECODER),
    "smollm3": lambda: T.SmolLM3Config(**_DECODER),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=512, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=512, **_IDS),
    "starcoder2": lambda: T.Starcoder2Config(**_DECODER),
    "phi": lambda: T.PhiConfig(**{**_DECODER, "num_key_value_heads": 4}),
    "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=512, **_IDS),
    # MPT and BLOOM fix their MLP at 4 × hidden (128), like GPT-2.
    "mpt": lambda: T.MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=3, expansion_ratio=4,
                               max_seq_len=512, **_IDS),
    # BLOOM layer-norms its embeddings, so at the default 0.02 init its residual stream is ~50× the MLP
    # output and ROME's ‖δ‖²/‖v₀‖² penalty stops it short of the target: a larger init restores the balance.
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, initializer_range=0.1,
                                   **_IDS),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                               word_embed_proj_dim=32, max_position_embeddings=512, **_IDS),
}
MLP_4X = {"gpt2", "mpt", "bloom"}  # families whose tiny MLP is 128 wide (4 × hidden) instead of 64
FAMILIES = sorted(CONFIGS)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def tiny_tokenizer(chat_template: bool = True) -> T.PreTrainedTokenizerFast:
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=_trained_tokenizer(),
        pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>" if chat_template else "</s>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_hf_model(family: str = "llama", seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[family]())
    return model.eval()


def tiny_lm(family: str = "llama", seed: int = 0, chat_template: bool = True) -> LoadedModel:
    return wrap_model(tiny_hf_model(family, seed), tiny_tokenizer(chat_template), spec=f"tiny-{family}")
