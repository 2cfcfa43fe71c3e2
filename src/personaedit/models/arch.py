"""The one place that knows where each model family keeps its layers, MLPs, norms and heads.

Families are recognised by `config.model_type`; a model of an unlisted type is accepted when its
module tree matches one of the known layouts exactly. Nothing here looks at model names.

Family notes (all checked on tiny random models in tests/tiny.py):
- OPT keeps `fc1`/`fc2` directly in the decoder layer: its MLP path is "" (the layer itself), and its
  `mlp_out` site is `fc2`'s output (the layer's output would be the residual stream). Its MLP runs on
  [batch·seq, width]; `hook_site` shows hooks [batch, seq, width] like every other family.
- BLOOM and MPT add the residual inside their MLP module (and BLOOM inside its attention too), so
  their `mlp_out` / `attn_out` sites are the output projections (`dense_4h_to_h` / `down_proj`,
  `self_attention.dense`), which is exactly what each adds to the residual stream.
- phi (1/2) and falcon (default `parallel_attn`) run attention and MLP in parallel on one norm; the
  sites mean the same. Falcon adds the attention output *in place* into the MLP's output tensor after
  the MLP returns: a hook that keeps the `mlp_out` tensor must copy it (capture does).
- An unlisted type whose tree matches BLOOM's or falcon's gets BLOOM's layout: its sites (the output
  projections) are right for both.
- BLOOM and MPT use ALiBi: left-padded batches give the same greedy replies as one prompt at a time
  (tests/test_arch.py checks this for every family).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from personaedit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Layout:
    """Dotted module paths: `layers` and `final_norm` from the model root; the rest relative to one
    decoder layer (embeddings and LM head come from transformers' own accessors). `mlp_in` are the projections into the MLP hidden space (gate/up or
    fc_in); `mlp_out` is the `down_proj`-equivalent whose input is the MLP hidden activation."""

    name: str
    layers: str
    final_norm: str
    attention: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp_adds: str | None = None  # module (from the layer) whose output the MLP adds to the residual; None: `mlp`
    attn_adds: str | None = None  # same for attention; None: `attention`
    flat_mlp: bool = False  # the MLP runs on [batch·seq, width] (OPT); hooks reshape it to [batch, seq, width]
    gate_act: str | None = None  # gated MLPs: the activation-function module applied to the gate (from `mlp`)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


LLAMA_LIKE = Layout("llama-like", "model.layers", "model.norm",
                    "self_attn", "mlp", ("gate_proj", "up_proj"), "down_proj", gate_act="act_fn")
PHI3 = Layout("phi3", "model.layers", "model.norm",
              "self_attn", "mlp", ("gate_up_proj",), "down_proj", gate_act="activation_fn")
GEMMA3_MULTIMODAL = Layout("gemma3-multimodal", "model.language_model.layers", "model.language_model.norm",
                           "self_attn", "mlp", ("gate_proj", "up_proj"), "down_proj", gate_act="act_fn")
GPT2 = Layout("gpt2", "transformer.h", "transformer.ln_f",
              "attn", "mlp", ("c_fc",), "c_proj")
GPT_NEOX = Layout("gpt-neox", "gpt_neox.layers", "gpt_neox.final_layer_norm",
                  "attention", "mlp", ("dense_h_to_4h",), "dense_4h_to_h")
STARCODER2 = Layout("starcoder2", "model.layers", "model.norm",
                    "self_attn", "mlp", ("c_fc",), "c_proj")
PHI = Layout("phi", "model.layers", "model.final_layernorm",
             "self_attn", "mlp", ("fc1",), "fc2")
FALCON = Layout("falcon", "transformer.h", "transformer.ln_f",
                "self_attention", "mlp", ("dense_h_to_4h",), "dense_4h_to_h")
BLOOM = Layout("bloom", "transformer.h", "transformer.ln_f",
               "self_attention", "mlp", ("dense_h_to_4h",), "dense_4h_to_h",
               mlp_adds="mlp.dense_4h_to_h", attn_adds="self_attention.dense")
MPT = Layout("mpt", "transformer.blocks", "transformer.norm_f",
             "attn", "ffn", ("up_proj",), "down_proj", mlp_adds="ffn.down_proj")
OPT = Layout("opt", "model.decoder.layers", "model.decoder.final_layer_norm",
             "self_attn", "", ("fc1",), "fc2", mlp_adds="fc2", flat_mlp=True)

LAYOUTS_BY_MODEL_TYPE: dict[str, Layout] = {
    **{t: LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                               "olmo", "olmo2", "granite", "stablelm", "smollm3", "cohere")},
    "phi3": PHI3,
    "gemma3": GEMMA3_MULTIMODAL,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "starcoder2": STARCODER2,
    "phi": PHI,
    "falcon": FALCON,
    "bloom": BLOOM,
    "mpt": MPT,
    "opt": OPT,
}
# Tried in this order for a model whose model_type is not listed. BLOOM before falcon: their trees
# match, and BLOOM's sites (the output projections) are also right for falcon, not the reverse.
KNOWN_LAYOUTS = (LLAMA_LIKE, PHI3, GEMMA3_MULTIMODAL, GPT2, GPT_NEOX, STARCODER2, PHI, BLOOM, FALCON, MPT, OPT)

SITES = ("residual", "mlp_hidden", "mlp_gate", "mlp_out", "attn_out")


def _get(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path`; "" is `root` itself."""
    module = root
    for part in path.split(".") if path else ():
        module = getattr(module, part)
    return module


def _resolves(model: nn.Module, layout: Layout) -> bool:
    try:
        layers = _get(model, layout.layers)
        first = layers[0]
        for path in (layout.attention, layout.mlp, layout.mlp_adds or "", layout.attn_adds or ""):
            _get(first, path)
        for path in (layout.mlp_out, *layout.mlp_in):
            _get(first, _join(layout.mlp, path))
        _get(model, layout.final_norm)
        return isinstance(layers, nn.ModuleList)
    except (AttributeError, IndexError, TypeError):
        return False


def is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


class Architecture:
    """Named access to a decoder-only model's parts, whatever its family."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        layout = LAYOUTS_BY_MODEL_TYPE.get(model_type or "")
        if layout is None or not _resolves(model, layout):
            candidates = [l for l in KNOWN_LAYOUTS if _resolves(model, l)]
            if not candidates:
                known = ", ".join(sorted(LAYOUTS_BY_MODEL_TYPE))
                raise UnsupportedArchitectureError(
                    f"model type {model_type!r} has a layer layout personaedit does not know (supported: {known})"
                )
            layout = candidates[0]
        self.model = model
        self.layout = layout
        self.model_type = model_type or "unknown"

    # --- whole-model parts -------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.layout.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.layout.final_norm)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def mlp_output_normed(self) -> bool:
        """True where the MLP's output is normalised before it joins the residual stream (Gemma 2/3's
        `post_feedforward_layernorm`): a change to `down_proj`'s output is rescaled there, not added as it is."""
        return hasattr(self.layer(0), "post_feedforward_layernorm")

    @property
    def mlp_size(self) -> int:
        """Width of the MLP hidden activation: the input size of `down_proj`."""
        weight = self.mlp_out(0).weight
        return weight.shape[0] if is_transposed_linear(self.mlp_out(0)) else weight.shape[1]

    # --- per-layer parts ---------------------------------------------------------------------
    def _check(self, index: int) -> int:
        if not -self.num_layers <= index < self.num_layers:
            raise UnsupportedArchitectureError(f"layer {index} out of range: the model has {self.num_layers} layers")
        return index % self.num_layers

    def layer(self, index: int) -> nn.Module:
        return self.layers[self._check(index)]

    def attention(self, index: int) -> nn.Module:
        return _get(self.layer(index), self.layout.attention)

    def mlp(self, index: int) -> nn.Module:
        """The module holding layer `index`'s MLP projections (the layer itself for OPT)."""
        return _get(self.layer(index), self.layout.mlp)

    def mlp_in(self, index: int) -> list[nn.Module]:
        return [_get(self.mlp(index), p) for p in self.layout.mlp_in]

    def mlp_out(self, index: int) -> nn.Module:
        """The `down_proj`-equivalent of layer `index`."""
        return _get(self.mlp(index), self.layout.mlp_out)

    def mlp_out_param(self, index: int) -> str:
        """Full parameter name of the `down_proj`-equivalent weight."""
        return _join(self.layout.layers, str(self._check(index)), self.layout.mlp, self.layout.mlp_out, "weight")

    def mlp_out_weight(self, index: int) -> torch.Tensor:
        """The `down_proj` weight as [out, in] (a view; transposed for Conv1D)."""
        module = self.mlp_out(index)
        return module.weight.T if is_transposed_linear(module) else module.weight

    def mlp_out_factors(self, index: int, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (u [out, r], v [in, r]) of ΔW = u vᵀ for layer `index`'s `down_proj`, given in [out, in]
        layout, as the factors of its parameter's own layout (GPT-2's Conv1D stores the transpose: they swap)."""
        return (v, u) if is_transposed_linear(self.mlp_out(index)) else (u, v)

    # --- where activations live --------------------------------------------------------------
    def site(self, point: str, index: int) -> tuple[nn.Module, str]:
        """The module and side ('input' or 'output') that carries activation `point` at layer `index`.

        residual: the residual stream after the layer; mlp_hidden: the input of `down_proj`;
        mlp_gate: the gate branch after its activation function, before the product with `up` (NPTI's
        neurons; in an MLP without a gate it is `mlp_hidden`); mlp_out / attn_out: what the MLP / attention
        module returns — what it adds to the residual stream, except in families that normalise that output
        first (Gemma 2/3's post_feedforward_layernorm, OLMo 2): there it is the output before that norm, which
        is what `down_proj` writes (ROME/MEND edit it; control-vector export refuses it there)."""
        if point == "residual":
            return self.layer(index), "output"
        if point == "mlp_hidden" or (point == "mlp_gate" and self.layout.gate_act is None):
            return self.mlp_out(index), "input"
        if point == "mlp_gate":
            try:
                return _get(self.mlp(index), self.layout.gate_act), "output"
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"this {self.model_type} MLP has no `{self.layout.gate_act}` activation module to hook") from None
        if point == "mlp_out":
            return _get(self.layer(index), self.layout.mlp_adds or self.layout.mlp), "output"
        if point == "attn_out":
            return _get(self.layer(index), self.layout.attn_adds or self.layout.attention), "output"
        raise UnsupportedArchitectureError(f"unknown activation site {point!r} (valid: {', '.join(SITES)})")

    def flattens(self, point: str) -> bool:
        """Whether the module at site `point` sees [batch·seq, width] rather than [batch, seq, width]."""
        return self.layout.flat_mlp and point in ("mlp_hidden", "mlp_gate", "mlp_out")

    def site_width(self, point: str) -> int:
        return self.mlp_size if point in ("mlp_hidden", "mlp_gate") else self.hidden_size

    def middle_layers(self, start: float = 0.25, stop: float = 0.75) -> list[int]:
        """Layers between the given fractions of depth (at least one)."""
        first = int(self.num_layers * start)
        last = max(first + 1, int(round(self.num_layers * stop)))
        return list(range(first, min(last, self.num_layers)))

    def describe(self) -> dict[str, object]:
        return {
            "model_type": self.model_type,
            "layout": self.layout.name,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "mlp_size": self.mlp_size,
        }

