"""Collect activations at named sites for a batch of chat prompts: the one implementation that steer,
npti and dpnle share. Results are cached on disk per (model fingerprint, prompts, sites, reduction).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from personaedit.fileio import atomic_path
from personaedit.methods.contrast import ContrastivePairs
from personaedit.option_groups import option
from personaedit.models.forward import encode_prompts, left_pad, position_ids, run_until
from personaedit.models.generation import build_messages, render_chat
from personaedit.models.hooks import hooked
from personaedit.models.loading import LoadedModel, cache_dir
from personaedit.progress import Progress

Site = tuple[str, int]  # (point, layer), e.g. ("mlp_hidden", 12)
REDUCTIONS = ("last", "mean", "firing")


@dataclass(frozen=True)
class ActivationOptions:
    """The options steer, NPTI and DPN-LE share: where the edit acts, the seed of the prompt draw, the batch
    activations are collected in. Fields with help are method options (an option group, see option_groups.py)."""

    prompt_too: bool = option(False, "edit the prompt's positions too (default: generated tokens only)")
    seed: int = option(0, "seed of the random draw of contrastive pairs or persona descriptions")
    batch_size: int = option(16, "prompts per forward pass while collecting activations")

    @property
    def positions(self) -> str:
        """The positions an intervention acts at."""
        return "all" if self.prompt_too else "generated"


def _cache_key(lm: LoadedModel, texts: Sequence[str], sites: Sequence[Site], reduce: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([lm.fingerprint, reduce, [list(s) for s in sites]]).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:24]


def render_prompts(lm: LoadedModel, prompts: Sequence[tuple[str | None, str]]) -> tuple[list[str], bool]:
    """(system, user) pairs -> chat texts as generation would see them, and whether a template was used."""
    rendered = [render_chat(lm.tokenizer, build_messages(lm, user, system)) for system, user in prompts]
    return [text for text, _ in rendered], bool(rendered and rendered[0][1])


def capture(
    lm: LoadedModel,
    prompts: Sequence[tuple[str | None, str]],
    sites: Sequence[Site],
    *,
    reduce: str = "last",
    batch_size: int = 16,
    use_cache: bool = True,
    openings: Sequence[str] | None = None,
    on_progress: Progress | None = None,
) -> dict[Site, torch.Tensor]:
    """Activations [n_prompts, width] per site, in float32 on the CPU.

    With `openings`, each prompt's reply starts with its opening (the text after the chat template's assistant
    turn) and 'last' reads the opening's last token.

    reduce='last': the activation at the last prompt token (the one that predicts the reply);
    'mean': the mean over the prompt's real tokens; 'firing': the share of real tokens where the
    activation is > 0 (NPTI's firing frequency)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}")
    texts, templated = render_prompts(lm, prompts)
    if openings is not None:
        joint = "" if templated else " "  # a plain transcript ends at 'Assistant:'
        texts = [text + joint + opening for text, opening in zip(texts, openings, strict=True)]
    key = _cache_key(lm, texts, sites, reduce)
    path = cache_dir() / "activations" / f"{key}.safetensors"
    if use_cache and path.is_file():
        stored = load_file(str(path))
        return {site: stored[f"{site[0]}.{site[1]}"] for site in sites}

    collected: dict[Site, list[torch.Tensor]] = {site: [] for site in sites}
    mask_holder: dict[str, torch.Tensor] = {}

    def recorder(site: Site):
        def record(hidden: torch.Tensor) -> None:
            mask = mask_holder["mask"].to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
            if reduce == "last":
                value = hidden[:, -1, :]  # left padding: the last position is every prompt's last token
            elif reduce == "mean":
                value = (hidden * mask).sum(1) / mask.sum(1)
            else:
                value = ((hidden > 0).to(hidden.dtype) * mask).sum(1) / mask.sum(1)
            # copy=True: a slice of the batch activation would otherwise keep the whole batch alive
            collected[site].append(value.detach().to("cpu", torch.float32, copy=True))
            return None

        return record

    deepest = max(layer for _, layer in sites)  # nothing above the deepest site is needed
    with hooked(lm.arch, [(point, layer, recorder((point, layer))) for point, layer in sites]):
        for start in range(0, len(texts), batch_size):
            batch = encode_prompts(lm, texts[start:start + batch_size], add_special_tokens=not templated)
            mask_holder["mask"] = batch["attention_mask"]
            run_until(lm, deepest, **batch, position_ids=position_ids(batch["attention_mask"]))
            if on_progress:
                on_progress(min(start + batch_size, len(texts)), len(texts))
    result = {site: torch.cat(chunks) for site, chunks in collected.items()}
    if use_cache:
        with atomic_path(path) as tmp:
            save_file({f"{p}.{l}": t.contiguous() for (p, l), t in result.items()}, str(tmp))
    return result


def capture_pairs(lm: LoadedModel, pairs: "ContrastivePairs", sites: Sequence[Site], **options) -> tuple[
        dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    """`capture` for both sides of contrastive pairs: (high-pole activations, low-pole activations)."""
    return (capture(lm, pairs.high, sites, openings=pairs.openings, **options),
            capture(lm, pairs.low, sites, openings=pairs.openings, **options))


def over_replies(
    lm: LoadedModel,
    prompts: Sequence[tuple[str | None, str]],
    replies: Sequence[str],
    sites: Sequence[Site],
    consume: Callable[[Site, torch.Tensor], None],
    *,
    batch_size: int = 16,
    on_progress: Progress | None = None,
) -> int:
    """Run prompt + reply through the model (teacher forcing) and hand `consume(site, activations)` the
    activations [reply tokens in the batch, width] at the replies' own tokens, batch by batch, in float32.

    Causal attention makes these the activations the decoding steps computed while writing each reply, so
    statistics 'on generated tokens' need no hooks inside the generation loop. Returns the reply token count."""
    texts, templated = render_prompts(lm, prompts)
    prompt_ids = lm.tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    reply_ids = lm.tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    deepest = max(layer for _, layer in sites)
    where: dict[str, torch.Tensor] = {}

    def recorder(site: Site):
        def record(hidden: torch.Tensor) -> None:
            consume(site, hidden[where["reply"]].to("cpu", torch.float32))
            return None

        return record

    total = 0
    with hooked(lm.arch, [(point, layer, recorder((point, layer))) for point, layer in sites]):
        for start in range(0, len(texts), batch_size):
            chunk = range(start, min(start + batch_size, len(texts)))
            batch = left_pad(lm, [prompt_ids[i] + reply_ids[i] for i in chunk])
            width = batch["input_ids"].shape[1]
            reply = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
            for row, i in enumerate(chunk):  # left padding: each reply ends at the last position
                reply[row, width - len(reply_ids[i]):] = len(reply_ids[i]) > 0
            where["reply"] = reply
            total += int(reply.sum())
            run_until(lm, deepest, **batch, position_ids=position_ids(batch["attention_mask"]))
            if on_progress:
                on_progress(chunk.stop, len(texts))
    return total
