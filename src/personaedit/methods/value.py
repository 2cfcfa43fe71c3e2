"""The value optimisation that ROME, PALETTE and MEMIT share: the vector δ that, added to an activation at
the subject token, makes the model continue a request with its target, and the keys read on the way.

Every tokenised request (locate.py) is split at the first subject token: the part before it does not
depend on δ, so it runs once and its attention cache is reused by every optimisation step (`_PrefixReplay`),
and only the part from the subject on is recomputed with gradients, for one δ shared by all prefixes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from personaedit.errors import PersonaEditError
from personaedit.methods.locate import Request, RequestTokens, tokenise_request
from personaedit.option_groups import option
from personaedit.models.forward import frozen, left_pad, position_ids, run_until
from personaedit.models.hooks import hooked
from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.models.loading import LoadedModel


@dataclass(frozen=True)
class ValueOptions:
    """The value optimisation that ROME, PALETTE and MEMIT share (PALETTE's settings), and the prefixes
    each request is read after. Fields with help are method options (an option group, see option_groups.py)."""

    subject_token: str = option("last", "read the key at the subject's first or last token (first, last)")
    steps: int = option(25, "at most this many Adam steps per request (stops early at NLL < 0.05)")
    lr: float = option(0.4, "learning rate of the value optimisation")
    kl_factor: float = option(0.0625, 'weight of the KL term that keeps "{subject} is a" contexts unchanged')
    weight_decay: float = option(1e-4, "weight of the ‖δ‖² penalty on the value change")
    clamp: float = option(4.0, "‖δ‖ is clamped to this many times the norm of the original value")
    prefixes: int = option(5, "model-written random prefixes the key and value are averaged over (0: the bare prompt only)")
    prefix_length: int = option(10, "tokens of each random prefix")
    seed: int = option(0, "seed of the random prefixes")
    stop_nll: float = 0.05
    kl_prompt: str = "{} is a"

    def check(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.kl_factor < 0 or self.weight_decay < 0 or self.clamp <= 0:
            raise PersonaEditError("value optimisation needs steps >= 1, lr > 0, kl_factor >= 0, weight_decay >= 0, clamp > 0")


class _PrefixReplay:
    """Runs the shared part of every prefixed prompt (plus `extra` ids) on a fixed attention cache of the part
    before it. The chunk's passage through the layers below `replay_below` does not change between
    optimisation steps: it is recorded on the first call and replayed after that."""

    def __init__(self, lm: LoadedModel, tokens: RequestTokens, extra: Sequence[int] = (), replay_below: int = 0):
        self.lm = lm
        rows = len(tokens.before)
        self.chunk = torch.tensor([list(tokens.after) + list(extra)] * rows, device=lm.device)
        self.cache = None
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=lm.device)
        offset = torch.zeros(rows, dtype=torch.long, device=lm.device)
        if any(tokens.before):  # tokenise_request keeps either all or none of them empty
            batch = left_pad(lm, tokens.before)
            self.mask = batch["attention_mask"]
            with torch.no_grad():
                out = lm.model(**batch, position_ids=position_ids(self.mask), use_cache=True, logits_to_keep=1)
            self.cache = cache_of(out)
            offset = self.mask.sum(1)
        self.positions = offset[:, None] + torch.arange(self.chunk.shape[1], device=lm.device)[None, :]
        self.replay_below = replay_below
        self.recorded: dict[int, object] = {}

    def __call__(self, logits_at: torch.Tensor | int = 1):
        """The model output on the chunk; the cache is copied because a forward pass appends to it."""
        mask = torch.cat([self.mask, torch.ones_like(self.chunk)], dim=1)
        cache = self._copy_of_cache()
        with self._replaying():
            return self.lm.model(input_ids=self.chunk, attention_mask=mask, position_ids=self.positions,
                                 use_cache=cache is not None, logits_to_keep=logits_at, **{cache_argument(self.lm.model): cache})

    def _copy_of_cache(self):
        """A copy of the cache for one forward pass. Once the layers below `replay_below` are replayed they
        run no attention and leave their cache layers as they are, so those are shared with the copy rather
        than copied: each pass copies only what it appends to."""
        if self.cache is None:
            return None
        layers = getattr(self.cache, "layers", None)
        if len(self.recorded) < self.replay_below or not isinstance(layers, list):
            return copy.deepcopy(self.cache)  # this pass runs (and records) every layer
        return copy.deepcopy(self.cache, {id(layer): layer for layer in layers[:self.replay_below]})

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        layers = [self.lm.arch.layer(i) for i in range(self.replay_below)]
        handles, patched = [], []
        if len(self.recorded) < len(layers):
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_hook(
                    lambda _m, _a, output, i=i: self.recorded.__setitem__(i, output)))
        else:
            for i, layer in enumerate(layers):
                layer.forward = lambda *_a, i=i, **_k: self.recorded[i]
                patched.append(layer)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in patched:
                del layer.forward  # back to the class's forward


def keys_and_outputs(lm: LoadedModel, tokens: RequestTokens, layer: int, site: tuple[str, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean over prefixes of the `down_proj` input at `layer` at the subject token ([mlp_size], float32),
    and, if `site` is given, the mean activation there at the subject token."""
    recorded: dict[str, torch.Tensor] = {}
    index = tokens.subject_index

    def record(name: str):
        def fn(hidden: torch.Tensor) -> None:
            recorded[name] = hidden[:, -len(tokens.after) + index, :].detach().float().mean(0)
        return fn

    sites = [("mlp_hidden", layer, record("key"))] + ([(site[0], site[1], record("site"))] if site is not None else [])
    batch = left_pad(lm, [list(b) + list(tokens.after) for b in tokens.before])
    with hooked(lm.arch, sites):
        run_until(lm, max(layer, site[1]) if site is not None else layer, **batch,
                  position_ids=position_ids(batch["attention_mask"]))
    return recorded["key"], recorded.get("site")


def _kl_tokens(lm: LoadedModel, request: Request, value_options: ValueOptions) -> RequestTokens:
    kl_request = Request(value_options.kl_prompt, request.subject, request.target)
    return tokenise_request(lm, kl_request, [], value_options.subject_token)


@dataclass(frozen=True)
class Value:
    """The outcome of a value optimisation: δ, the unedited activation it is added to (mean over prefixes),
    the mean `down_proj` input at the key layer, and how the optimisation went."""

    delta: torch.Tensor
    reference: torch.Tensor
    key: torch.Tensor | None
    info: dict[str, float]


def optimise_delta(
    lm: LoadedModel,
    request: Request,
    tokens: RequestTokens,
    site: tuple[str, int],
    value_options: ValueOptions,
    *,
    key_layer: int | None = None,
) -> Value:
    """The vector δ that, added to the activation at `site` at the subject token after every prefix, makes
    the model continue with the target: NLL + kl_factor·KL(base ‖ edited on the KL prompt) +
    weight_decay·‖δ‖²/‖v₀‖², Adam, ‖δ‖ clamped to clamp·‖v₀‖, stop at NLL < stop_nll,
    where v₀ is the unedited activation. The key at `key_layer` is read in the same first pass."""
    value_options.check()
    target = torch.tensor(tokens.target, device=lm.device)
    n_target = len(tokens.target)
    main = _PrefixReplay(lm, tokens, extra=tokens.target[:-1], replay_below=site[1])
    target_positions = torch.arange(len(tokens.after) - 1, len(tokens.after) - 1 + n_target, device=lm.device)
    kl_tokens = _kl_tokens(lm, request, value_options)
    kl_run = _PrefixReplay(lm, kl_tokens, replay_below=site[1])

    width = lm.arch.site_width("mlp_hidden" if site[0] == "mlp_hidden" else "residual")
    delta = torch.zeros(width, device=lm.device, requires_grad=True)
    state: dict[str, object] = {"index": tokens.subject_index, "record": True}

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        # Only the chunk from the first subject token on runs through this hook.
        index = state["index"]
        if state["record"]:
            state["reference"] = hidden[:, index, :].detach().float().mean(0)
        patched = hidden.clone()
        patched[:, index, :] = patched[:, index, :] + delta.to(hidden.dtype)
        return patched

    def record_key(hidden: torch.Tensor) -> None:
        if state["record"]:
            state["key"] = hidden[:, state["index"], :].detach().float().mean(0)

    sites = [(site[0], site[1], add_delta)] + ([("mlp_hidden", key_layer, record_key)] if key_layer is not None else [])
    optimiser = torch.optim.Adam([delta], lr=value_options.lr)
    info = {"steps": 0, "nll": float("nan"), "nll_start": float("nan")}
    with hooked(lm.arch, sites), frozen(lm.model):
        if value_options.kl_factor > 0:
            with torch.no_grad():
                state.update(index=kl_tokens.subject_index, record=False)
                base_kl = kl_run(1).logits[:, -1].float().log_softmax(-1)
        for step in range(value_options.steps + 1):
            state.update(index=tokens.subject_index, record=step == 0)
            logits = main(target_positions).logits.float().log_softmax(-1)  # [rows, n_target, vocab]
            nll = -logits.gather(2, target.expand(logits.shape[0], -1)[..., None]).squeeze(-1).mean()
            info["nll"] = float(nll.detach())
            if step == 0:
                info["nll_start"] = info["nll"]
                reference = state["reference"]
                max_norm = value_options.clamp * float(reference.norm())
                ref_sq = float(reference.norm()) ** 2 + 1e-12
            if info["nll"] < value_options.stop_nll or step == value_options.steps:
                break
            loss = nll + value_options.weight_decay * delta.pow(2).sum() / ref_sq
            if value_options.kl_factor > 0:
                state.update(index=kl_tokens.subject_index, record=False)
                edited_kl = kl_run(1).logits[:, -1].float().log_softmax(-1)
                loss = loss + value_options.kl_factor * torch.nn.functional.kl_div(
                    edited_kl, base_kl, log_target=True, reduction="batchmean")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            info["steps"] = step + 1
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    return Value(delta.detach(), reference, state.get("key"), info)
