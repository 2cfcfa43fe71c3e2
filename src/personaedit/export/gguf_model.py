"""A model (a merged or edited one) as a GGUF file that llama.cpp runs (`llama-cli -m FILE.gguf`), written with
the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes the same model.

Supported: the llama family as llama.cpp knows it: `llama` and `mistral` (llama.cpp architecture `llama`) and
`qwen2` (architecture `qwen2`, with its q/k/v biases), without rope scaling. Tensor names come from gguf's own
name map (token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output;
no `output` when the embeddings are tied). For architecture `llama`, the rows of attn_q and attn_k are
permuted as llama.cpp's converter does (`LlamaModel.permute`): llama.cpp's llama rope rotates adjacent pairs
of each head, as Meta's original weights expect, where transformers rotates its halves; transformers' GGUF
reader undoes exactly this. qwen2 uses NeoX-style rope (halves) in llama.cpp and is not permuted.
Metadata: context length, embedding length, block count, feed-forward length, head counts, rope base and
dimension count, RMS epsilon, vocabulary size, file type.

The tokenizer: when the model came from a GGUF file (`default`, a `.gguf` spec, a folder personaedit
converted from one, or a merge whose base was one), its `tokenizer.*` metadata is copied as it is. Otherwise
it is built from the Hugging Face fast tokenizer, which must be byte-level BPE (`tokenizer.ggml.model` gpt2:
tokens, token types, merges, special token ids, chat template); llama.cpp's pre-tokenizer name cannot be
derived then and is written as `default` (llama.cpp's generic GPT-2 split).

`dtype`: f32, f16 (2-D weights; norms stay f32 as llama.cpp wants) or q8_0 (gguf's own quantiser).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personaedit.edits import Edit, WeightEdit
from personaedit.errors import PersonaEditError
from personaedit.export.base import ExportError, ExportResult, kind_phrase, leaves, refuse_foreign_file

SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
DTYPES = ("f32", "f16", "q8_0")
GGUF_MAGIC = b"GGUF"
_CACHE_STAMP = "personaedit-cache.json"
_MERGE_RECORD = "personaedit-merge.json"


def permute_rows(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's converter's Q/K permutation (LlamaModel.permute): within each head, interleaved rope pairs
    become halves."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_refusal(config: Any) -> str | None:
    """Why a model of this config cannot be exported (None when it can)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return (f"GGUF export supports the llama family ({', '.join(SUPPORTED)}); {model_type!r} is not one "
                "(llama.cpp's convert_hf_to_gguf.py converts more)")
    for rope in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        kind = (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else "default"
        if kind != "default":
            return f"rope scaling ({kind}) is not supported by this export"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not supported by this export"
    if model_type != "qwen2" and getattr(config, "attention_bias", False):
        return "attention biases on a llama model are not supported by this export"
    return None


def source_gguf(spec: str, folder: Path | None) -> Path | None:
    """The GGUF file a model spec (or its folder) was converted from, if any."""
    from personaedit.models.loading import default_model_gguf

    if spec == "default":
        return default_model_gguf()
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    if folder is None:
        return None
    for name, key in ((_CACHE_STAMP, "source"), (_MERGE_RECORD, "base")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, str) and value != spec:
            if name == _CACHE_STAMP:
                return Path(value) if Path(value).is_file() else None
            try:
                from personaedit.models.loading import resolve_source

                return source_gguf(value, Path(resolve_source(value)))
            except PersonaEditError:
                return None
    return None


def _copy_tokenizer(writer: Any, path: Path, vocab_size: int) -> bool:
    """Copy every tokenizer.* field of GGUF `path`; False when its vocabulary does not fit the model."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        return False
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
    return True


def _build_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.* from a Hugging Face fast tokenizer (byte-level BPE), as convert_hf_to_gguf does."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="personaedit-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = Path(tmp) / "tokenizer.json"
        kind = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["type"] if tokenizer_json.is_file() else None
        if kind != "BPE":
            raise PersonaEditError(f"the model's tokenizer is {kind or 'not a fast tokenizer'}; GGUF export builds byte-level "
                                   "BPE tokenizers only (convert with llama.cpp's convert_hf_to_gguf.py)")
        reverse = {index: token for token, index in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(vocab_size):
            if index not in reverse:
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            elif index in added:
                tokens.append(reverse[index])
                types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[index])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensor_data(array: np.ndarray, dtype: str):
    import gguf

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        return array.astype(np.float16), None  # q8_0 blocks are 32 wide; llama.cpp's converter falls back likewise
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_gguf(lm: Any, out: Path, *, dtype: str = "f16", name: str | None = None, tokenizer_from: Path | None = None) -> dict:
    """Write the model of `lm` (as it is now, edits applied included) to GGUF `out`, atomically."""
    import gguf

    from personaedit.fileio import atomic_path

    config = lm.model.config
    reason = gguf_refusal(config)
    if reason:
        raise PersonaEditError(reason)
    if dtype not in DTYPES:
        raise PersonaEditError(f"unknown GGUF dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    arch_name = SUPPORTED[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    names = gguf.get_tensor_name_map(arch, layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = lm.model.state_dict()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    notes: list[str] = []
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        notes.append(f"sliding window {config.sliding_window} dropped (llama.cpp's llama architecture has none)")
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_name(name or "personaedit export")
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(heads))
        writer.add_head_count_kv(int(kv_heads))
        writer.add_rope_freq_base(float(theta))
        writer.add_rope_dimension_count(int(head_dim))
        if head_dim != config.hidden_size // heads:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(int(file_type))
        copied = tokenizer_from is not None and _copy_tokenizer(writer, tokenizer_from, int(config.vocab_size))
        if not copied:
            _build_tokenizer(writer, lm.tokenizer, int(config.vocab_size))
            notes.append("tokenizer built from the Hugging Face tokenizer (pre-tokenizer 'default')")
        written = 0
        for key, tensor in state.items():
            if key == "lm_head.weight" and tied:
                continue
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None or target.endswith("attn_rot_embd"):
                if target is None and key.endswith((".weight", ".bias")):
                    raise PersonaEditError(f"no GGUF name for tensor {key} of this {config.model_type} model")
                continue
            weight = tensor.detach().to("cpu", torch.float32)
            if arch_name == "llama" and key.endswith("q_proj.weight"):
                weight = permute_rows(weight, heads, heads)
            elif arch_name == "llama" and key.endswith("k_proj.weight"):
                weight = permute_rows(weight, heads, kv_heads)
            data, raw = _tensor_data(weight.numpy(), dtype)
            writer.add_tensor(target, data, raw_dtype=raw)
            written += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"tensors": written, "arch": arch_name, "tokenizer": "copied" if copied else "built", "notes": notes}


def export_gguf_model(source: str, out: str | Path, *, edit: Edit | None = None, model: str | None = None,
                      strength: float = 1.0, dtype: str = "f16", force: bool = False) -> ExportResult:
    """Write a model as GGUF: `source` is a model spec (a merged folder, `default`, ...) or, with `edit`, the
    edit is applied at `strength` to `model` (default: the model it was fitted on) first."""
    from personaedit.export import formats_for
    from personaedit.export.base import model_spec_for
    from personaedit.models import load_model

    start = time.perf_counter()
    out = Path(out)
    refuse_foreign_file(out, GGUF_MAGIC)
    if dtype not in DTYPES:
        raise PersonaEditError(f"unknown GGUF dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    if edit is not None:
        others = [leaf for leaf, _ in leaves(edit) if not isinstance(leaf, WeightEdit)]
        if others:
            raise ExportError(f"a GGUF model holds weights; {kind_phrase(edit, others[0])}, which changes no weight",
                              formats_for(edit, annotated=True))
        spec = model_spec_for(edit, model)
    else:
        spec = model or source
    lm = load_model(spec, device="cpu", dtype="float32")
    reason = gguf_refusal(lm.model.config)
    if reason:
        raise ExportError(reason, formats_for(edit, annotated=True)) if edit is not None else PersonaEditError(reason)
    tokenizer_from = source_gguf(spec, Path(lm.source) if Path(lm.source).is_dir() else None)
    name = Path(spec).name if spec != "default" else "SmolLM2-135M-Instruct"
    if edit is not None:
        with edit.apply(lm, strength, force=force):
            info = write_gguf(lm, out, dtype=dtype, name=f"{name} + {edit.method}", tokenizer_from=tokenizer_from)
    else:
        info = write_gguf(lm, out, dtype=dtype, name=name, tokenizer_from=tokenizer_from)
    what = f"{info['arch']} model, {info['tensors']} tensors, {dtype}, tokenizer {info['tokenizer']}"
    return ExportResult("gguf", out, out.stat().st_size, time.perf_counter() - start, what, info["notes"],
                        {**info, "model": spec})
