"""Forward hooks at named activation sites, and which token positions count as 'generated'.

Every activation edit and every activation capture goes through `hook_site` (usually through `hooked`,
which removes its hooks however the block ends), so the handling of tuple outputs and pre-hooks lives
here once.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from personaedit.models.arch import Architecture

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]

# Per-row index of the first position whose activation produces generated text (the last prompt
# token onwards). Set by code that scores a prompt + answer in one forward pass.
_GENERATED_FROM: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("generated_from", default=None)


def hook_site(arch: Architecture, point: str, layer: int, fn: SiteFn) -> RemovableHandle:
    """Call `fn` on the activation at (`point`, `layer`); a tensor it returns replaces the activation."""
    module, side = arch.site(point, layer)
    if arch.flattens(point):  # OPT runs its MLP on [batch·seq, width]: show `fn` [batch, seq, width]
        return _unflattened(arch, layer, module, side, fn)
    return _hook(module, side, fn)


@contextlib.contextmanager
def hooked(arch: Architecture, sites: Iterable[tuple[str, int, SiteFn]]) -> Iterator[None]:
    """`hook_site(arch, point, layer, fn)` for each (point, layer, fn) during the block; every hook is removed
    on the way out, also when the block (or installing a later hook) raises."""
    with contextlib.ExitStack() as installed:
        for point, layer, fn in sites:
            installed.callback(hook_site(arch, point, layer, fn).remove)
        yield


def _hook(module: torch.nn.Module, side: str, fn: SiteFn) -> RemovableHandle:
    if side == "input":
        def pre_hook(_module, args):
            replaced = fn(args[0])
            return None if replaced is None else (replaced, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def post_hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        replaced = fn(hidden)
        if replaced is None:
            return None
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    return module.register_forward_hook(post_hook)


class _Handles:
    """Several hooks removed as one."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _unflattened(arch: Architecture, layer: int, module: torch.nn.Module, side: str, fn: SiteFn) -> RemovableHandle:
    shape: list[torch.Size] = []

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shape[:] = [hidden.shape[:-1]]

    def unflat(hidden: torch.Tensor) -> torch.Tensor | None:
        replaced = fn(hidden.view(*shape[0], hidden.shape[-1]))
        return None if replaced is None else replaced.reshape(hidden.shape)

    first = arch.layer(layer).register_forward_pre_hook(record, with_kwargs=True)
    return _Handles(first, _hook(module, side, unflat))  # type: ignore[return-value]


@contextlib.contextmanager
def generated_from(starts: torch.Tensor) -> Iterator[None]:
    """Within this block, positions >= starts[row] count as generated (for scoring prompt + answer)."""
    token = _GENERATED_FROM.set(starts)
    try:
        yield
    finally:
        _GENERATED_FROM.reset(token)


def generated_mask(hidden: torch.Tensor) -> torch.Tensor:
    """[batch, seq, 1] bool mask of the positions whose activations lead to generated tokens.

    During cached decoding each step sees one new token: all of it counts. On a full prompt the
    last position counts (it predicts the first generated token) unless `generated_from` says more."""
    batch, seq = hidden.shape[0], hidden.shape[1]
    starts = _GENERATED_FROM.get()
    positions = torch.arange(seq, device=hidden.device).unsqueeze(0)
    if starts is not None and starts.shape[0] == batch:
        mask = positions >= starts.to(hidden.device).unsqueeze(1)
    elif seq == 1:
        mask = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
    else:
        mask = (positions == seq - 1).expand(batch, seq)
    return mask.unsqueeze(-1)
