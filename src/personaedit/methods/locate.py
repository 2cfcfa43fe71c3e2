"""What ROME, PALETTE and MEMIT share: edit requests, where the subject sits, keys averaged over
model-written prefixes, the value optimisation, and the rank-one update.

A request is a prompt template with a `{}` subject slot, a subject ("I") and a target (" facts").
Each request is read in several contexts: the bare prompt and the prompt after short random prefixes
the model wrote itself. Every context is split at the first subject token: the part before it does
not depend on the edit, so it runs once (its attention cache is reused by every optimisation step),
and only the part from the subject on is recomputed with gradients, for one δ shared by all contexts.
The key k* (input of `down_proj` at the subject token, averaged over the contexts) is the same one
the value optimisation reads and the update uses (r-ROME's fix); the update is kept as factors (u, v).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from personaedit.edits import Delta
from personaedit.errors import PersonaEditError
from personaedit.models.forward import encode_prompts, ensure_pad_token, frozen, left_pad, position_ids, run_until
from personaedit.models.hooks import hooked
from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.methods.options import option
from personaedit.models.loading import LoadedModel

SUBJECT_TOKENS = ("first", "last")
# ROME starts its random prefixes with these words and ends each with ". " before the prompt.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Request:
    """Make the model continue `template` (with `subject` in its `{}` slot) with `target`."""

    template: str
    subject: str
    target: str

    @classmethod
    def of(cls, prompt: str, subject: str, target: str) -> "Request":
        """A request from a template with `{}`, or from a prompt that contains the subject as a word.

        The target gets a leading space when neither it nor the prompt supplies one."""
        if not subject or not subject.strip():
            raise PersonaEditError("the subject is empty; give the word the edit is about, e.g. --subject I")
        if not target or not target.strip():
            raise PersonaEditError("the target is empty; give the word the prompt should be continued with")
        slots = prompt.count("{}")
        if slots > 1:
            raise PersonaEditError(f"the prompt has {slots} '{{}}' subject slots; use exactly one: {prompt!r}")
        if slots == 0:
            found = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt)
            if found is None:
                raise PersonaEditError(f"subject {subject!r} does not occur in the prompt {prompt!r}; "
                                       "put it in the prompt or mark its place with {}")
            prompt = prompt[:found.start()] + "{}" + prompt[found.end():]
        if not target.startswith(" ") and not prompt.endswith(" "):
            target = " " + target
        return cls(prompt, subject, target)

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)


@dataclass(frozen=True)
class ValueOptions:
    """The value optimisation that ROME, PALETTE and MEMIT share (PALETTE's settings), and the contexts
    each request is read in. Fields with help are method options (an option group, see options.py)."""

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


def default_layer(num_layers: int) -> int:
    """The MLP layer PALETTE edits: 15/28 of the depth (its layer for Qwen2.5-1.5B), i.e. just past the middle."""
    return min(num_layers - 1, round(num_layers * 15 / 28))


def check_layer(lm: LoadedModel, layer: int | None) -> int:
    if layer is None:
        return default_layer(lm.arch.num_layers)
    if not 0 <= layer < lm.arch.num_layers:
        raise PersonaEditError(f"layer {layer} out of range: the model has layers 0-{lm.arch.num_layers - 1}")
    return layer


# ------------------------------------------------------------------------------------------- contexts

def random_prefixes(lm: LoadedModel, count: int = 10, length: int = 10, seed: int = 0) -> list[str]:
    """`count` short texts the model writes itself (seeded top-k sampling from ROME's start words)."""
    if count <= 0:
        return []
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    batch = encode_prompts(lm, starts, add_special_tokens=True)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = lm.model.generate(**batch, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
                                pad_token_id=ensure_pad_token(lm.tokenizer), temperature=None, top_p=None)
    texts = lm.tokenizer.batch_decode(out, skip_special_tokens=True)
    # Braces would read as template slots; line breaks would break the single-paragraph prompts.
    return [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]


@dataclass(frozen=True)
class Contexts:
    """A request read after each prefix: token ids before the first subject token (per context), the
    ids from the first subject token on (shared), the subject token offset in those, and the target ids."""

    before: list[list[int]]
    after: list[int]
    subject_index: int
    target: list[int]


def _subject_span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], int, int]:
    """Token ids of `text` and the first and last token overlapping characters [start, end)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PersonaEditError("locating the subject needs a fast tokenizer (with offset mappings)")
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise PersonaEditError(f"the subject of {text!r} maps to no token")
    return ids, hits[0], hits[-1]


def read_in_contexts(lm: LoadedModel, request: Request, prefixes: Sequence[str], token: str = "last") -> Contexts:
    """Tokenise the request bare and after each prefix, split at the first subject token."""
    if token not in SUBJECT_TOKENS:
        raise PersonaEditError(f"subject token must be 'first' or 'last', not {token!r}")
    slot = request.template.index("{}")
    bare = request.prompt
    ids, first, last = _subject_span(lm.tokenizer, bare, slot, slot + len(request.subject))
    after = ids[first:]
    before = [ids[:first]]
    for prefix in prefixes:
        text = f"{prefix}. {bare}"
        shift = len(prefix) + 2
        ctx_ids, ctx_first, _ = _subject_span(lm.tokenizer, text, slot + shift, slot + shift + len(request.subject))
        before.append(ctx_ids[:ctx_first])
    if not before[0] and len(before) > 1:
        before = before[1:]  # the bare prompt starts with the subject (no BOS): read it after prefixes only
    target = list(lm.tokenizer(request.target, add_special_tokens=False)["input_ids"])
    if not target:
        raise PersonaEditError(f"target {request.target!r} maps to no token")
    return Contexts(before, after, (last - first) if token == "last" else 0, target)


class _Runner:
    """Runs the shared part of every context (plus `extra` ids) on a fixed attention cache of the part
    before it. The chunk's passage through the layers below `replay_below` does not change between
    optimisation steps: it is recorded on the first call and replayed after that."""

    def __init__(self, lm: LoadedModel, contexts: Contexts, extra: Sequence[int] = (), replay_below: int = 0):
        self.lm = lm
        rows = len(contexts.before)
        self.chunk = torch.tensor([list(contexts.after) + list(extra)] * rows, device=lm.device)
        self.cache = None
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=lm.device)
        offset = torch.zeros(rows, dtype=torch.long, device=lm.device)
        if any(contexts.before):  # read_in_contexts keeps either all or none of them empty
            batch = left_pad(lm, contexts.before)
            self.mask = batch["attention_mask"]
            with torch.no_grad():
                out = lm.model(**batch, position_ids=position_ids(self.mask), use_cache=True, logits_to_keep=1)
            self.cache = cache_of(out)
            offset = self.mask.sum(1)
        self.positions = offset[:, None] + torch.arange(self.chunk.shape[1], device=lm.device)[None, :]
        self.replay_below = replay_below
        self.recorded: dict[int, object] = {}

    def __call__(self, keep: torch.Tensor | int = 1):
        """The model output on the chunk; the cache is copied because a forward pass appends to it."""
        mask = torch.cat([self.mask, torch.ones_like(self.chunk)], dim=1)
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        with self._replaying():
            return self.lm.model(input_ids=self.chunk, attention_mask=mask, position_ids=self.positions,
                                 use_cache=cache is not None, logits_to_keep=keep, **{cache_argument(self.lm.model): cache})

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


# ------------------------------------------------------------------------------------- keys and values

def keys_and_outputs(lm: LoadedModel, contexts: Contexts, layer: int, site: tuple[str, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean over contexts of the `down_proj` input at `layer` at the subject token ([mlp_size], float32),
    and, if `site` is given, the mean activation there at the subject token."""
    recorded: dict[str, torch.Tensor] = {}
    index = contexts.subject_index

    def record(name: str):
        def fn(hidden: torch.Tensor) -> None:
            recorded[name] = hidden[:, -len(contexts.after) + index, :].detach().float().mean(0)
        return fn

    sites = [("mlp_hidden", layer, record("key"))] + ([(site[0], site[1], record("site"))] if site is not None else [])
    batch = left_pad(lm, [list(b) + list(contexts.after) for b in contexts.before])
    with hooked(lm.arch, sites):
        run_until(lm, max(layer, site[1]) if site is not None else layer, **batch,
                  position_ids=position_ids(batch["attention_mask"]))
    return recorded["key"], recorded.get("site")


def _kl_contexts(lm: LoadedModel, request: Request, options: ValueOptions) -> Contexts:
    kl_request = Request(options.kl_prompt, request.subject, request.target)
    return read_in_contexts(lm, kl_request, [], options.subject_token)


@dataclass(frozen=True)
class Value:
    """The outcome of a value optimisation: δ, the unedited activation it is added to (mean over contexts),
    the mean `down_proj` input at the key layer, and how the optimisation went."""

    delta: torch.Tensor
    reference: torch.Tensor
    key: torch.Tensor | None
    info: dict[str, float]


def optimise_delta(
    lm: LoadedModel,
    request: Request,
    contexts: Contexts,
    site: tuple[str, int],
    options: ValueOptions,
    *,
    key_layer: int | None = None,
) -> Value:
    """The vector δ that, added to the activation at `site` at the subject token of every context, makes
    the model continue with the target: NLL + kl_factor·KL(base ‖ edited on the KL prompt) +
    weight_decay·‖δ‖²/‖v₀‖², Adam, ‖δ‖ clamped to clamp·‖v₀‖, stop at NLL < stop_nll,
    where v₀ is the unedited activation. The key at `key_layer` is read in the same first pass."""
    options.check()
    target = torch.tensor(contexts.target, device=lm.device)
    n_target = len(contexts.target)
    main = _Runner(lm, contexts, extra=contexts.target[:-1], replay_below=site[1])
    keep = torch.arange(len(contexts.after) - 1, len(contexts.after) - 1 + n_target, device=lm.device)
    kl_ctx = _kl_contexts(lm, request, options)
    kl_run = _Runner(lm, kl_ctx, replay_below=site[1])

    width = lm.arch.site_width("mlp_hidden" if site[0] == "mlp_hidden" else "residual")
    delta = torch.zeros(width, device=lm.device, requires_grad=True)
    state: dict[str, object] = {"index": contexts.subject_index, "record": True}

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
    optimiser = torch.optim.Adam([delta], lr=options.lr)
    info = {"steps": 0, "nll": float("nan"), "nll_start": float("nan")}
    with hooked(lm.arch, sites), frozen(lm.model):
        if options.kl_factor > 0:
            with torch.no_grad():
                state.update(index=kl_ctx.subject_index, record=False)
                base_kl = kl_run(1).logits[:, -1].float().log_softmax(-1)
        for step in range(options.steps + 1):
            state.update(index=contexts.subject_index, record=step == 0)
            logits = main(keep).logits.float().log_softmax(-1)  # [rows, n_target, vocab]
            nll = -logits.gather(2, target.expand(logits.shape[0], -1)[..., None]).squeeze(-1).mean()
            info["nll"] = float(nll.detach())
            if step == 0:
                info["nll_start"] = info["nll"]
                reference = state["reference"]
                max_norm = options.clamp * float(reference.norm())
                ref_sq = float(reference.norm()) ** 2 + 1e-12
            if info["nll"] < options.stop_nll or step == options.steps:
                break
            loss = nll + options.weight_decay * delta.pow(2).sum() / ref_sq
            if options.kl_factor > 0:
                state.update(index=kl_ctx.subject_index, record=False)
                edited_kl = kl_run(1).logits[:, -1].float().log_softmax(-1)
                loss = loss + options.kl_factor * torch.nn.functional.kl_div(
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


# ------------------------------------------------------------------------------------------- update

def rank_one(key: torch.Tensor, delta: torch.Tensor, inverse_moment: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u [out], v [in]) of ΔW = u vᵀ in [out, in] layout with ΔW k* = δ:
    v = C⁻¹k*, u = δ / (k*ᵀ C⁻¹ k*) (C = I without covariance adjustment).

    `keep` ([in, m], earlier keys): v is also made orthogonal to them, so ΔW maps each to 0 and
    leaves what earlier edits made of them as it was."""
    key64 = key.double()
    v = key64 if inverse_moment is None else inverse_moment.to(key64.device) @ key64
    if keep is not None and keep.shape[1]:
        basis, _ = torch.linalg.qr(keep.double().to(v.device))
        v = v - basis @ (basis.T @ v)
    u = delta.double() / float(key64 @ v)
    return u.float(), v.float()


def as_delta(lm: LoadedModel, layer: int, u: torch.Tensor, v: torch.Tensor) -> Delta:
    """Factors of ΔW = u vᵀ for layer `layer`'s `down_proj` (u [out, r], v [in, r] for ΔW in [out, in]) in the
    parameter's own layout (GPT-2's Conv1D stores the transpose: the factors swap)."""
    u, v = lm.arch.mlp_out_factors(layer, u.float().cpu().contiguous(), v.float().cpu().contiguous())
    return Delta(u=u, v=v)


@dataclass(frozen=True)
class RankOne:
    """One request's update at one layer: ΔW = u vᵀ ([out], [in]) and how the optimisation went."""

    u: torch.Tensor
    v: torch.Tensor
    key: torch.Tensor
    info: dict[str, float]


def edit_request(lm: LoadedModel, request: Request, layer: int, prefixes: Sequence[str], options: ValueOptions, *,
                 inverse_moment: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> RankOne:
    """r-ROME for one request on the model as it is now: averaged key, value optimised at that key's output
    (`keep`: earlier keys the update must leave alone, see `rank_one`)."""
    contexts = read_in_contexts(lm, request, prefixes, options.subject_token)
    # The mean `down_proj` output over contexts is W k* + b for the mean key k*: v₀ of the consistent key.
    value = optimise_delta(lm, request, contexts, ("mlp_out", layer), options, key_layer=layer)
    u, v = rank_one(value.key, value.delta, inverse_moment, keep)
    return RankOne(u, v, value.key, {**value.info, "delta_norm": float(value.delta.norm()), "value_norm": float(value.reference.norm())})


def greedy_continuations(lm: LoadedModel, prompts: Sequence[str], lengths: Sequence[int],
                         batch_size: int = 16) -> list[list[int]]:
    """Greedy token ids continuing each raw-text prompt, `lengths[i]` tokens for prompt i."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(lm, prompts[start:start + batch_size], add_special_tokens=True)
        longest = max(lengths[start:start + batch_size])
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            generated = lm.model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                          pad_token_id=ensure_pad_token(lm.tokenizer), temperature=None, top_p=None, top_k=None)
        for row, n in enumerate(lengths[start:start + batch_size]):
            out.append(generated[row, width:width + n].tolist())
    return out


def efficacy(lm: LoadedModel, requests: Sequence[Request]) -> list[bool]:
    """Per request: is the target the greedy continuation of its prompt?"""
    targets = [list(lm.tokenizer(r.target, add_special_tokens=False)["input_ids"]) for r in requests]
    got = greedy_continuations(lm, [r.prompt for r in requests], [len(t) for t in targets])
    return [g == t for g, t in zip(got, targets)]


Progress = Callable[[int, int], None]
