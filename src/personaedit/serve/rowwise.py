"""Apply a different edit to each row of one batch: the mechanics behind serving many edits at once.

`Edit.apply` changes the whole model; a server batching requests with different edits needs each row to
see only its own. Per kind:
- activation: the edit's own hook body (`_intervene`) runs on the batch and a row mask keeps its result
  only on the rows that asked for it;
- weight: ΔW is never merged into the shared weights; the affected module's output gets
  y += s·x·ΔWᵀ on the rows using the edit. Low-rank factors stay factors (y += s·(x·v)·uᵀ, the multi-LoRA
  idea); a dense ΔW is applied as it is (exact; it costs one extra matmul of that module for those rows
  only, where a truncated SVD would cost less and change the edit);
- context: each row renders its own conversation (`conversation`), so nothing is installed on the model.
Rows without an edit see the unchanged model, bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from personaedit.edits import ActivationEdit, ComposedEdit, ContextEdit, Edit, RoutedEdit, WeightEdit
from personaedit.edits.activation import Intervention, _intervene
from personaedit.edits.routed import Router, scope_encoder
from personaedit.edits.weight import Delta
from personaedit.errors import EditError
from personaedit.models.arch import is_transposed_linear
from personaedit.models.hooks import hook_site
from personaedit.models.loading import LoadedModel


def flatten(edit: Edit, strength: float) -> list[tuple[Edit, float]]:
    """The simple edits inside `edit` with the strength each acts at (as `Edit.apply` would scale them)."""
    effective = float(strength) * edit.scale
    if isinstance(edit, ComposedEdit):
        return [pair for part, weight in edit.parts for pair in flatten(part, effective * weight)]
    return [(edit, effective)]


@dataclass(frozen=True)
class _ModuleDelta:
    """How one weight delta changes the output of one module that uses the parameter."""

    module: nn.Module
    op: str  # "linear" (y += x·Wᵀ layout), "conv1d" (y += x·W layout), "embedding" (y += W[ids]), "bias"
    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def change(self, inputs: torch.Tensor) -> torch.Tensor:
        """The output change (before strength) for `inputs` (activations, or token ids for embeddings)."""
        if self.op == "bias":
            return self.dense.expand(*inputs.shape[:-1], -1)
        if self.op == "embedding":
            return self.dense[inputs] if self.dense is not None else self.u[inputs] @ self.v.T
        if self.dense is not None:
            return inputs @ (self.dense.T if self.op == "linear" else self.dense)
        # Linear keeps W as [out, in]: x·(u vᵀ)ᵀ = (x·v)·uᵀ; Conv1D keeps [in, out]: x·u vᵀ.
        first, second = (self.v, self.u) if self.op == "linear" else (self.u, self.v)
        return (inputs @ first) @ second.T


def _users_of(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding `param`: tied embeddings are both the input and output matrix."""
    return [(module, attr) for module in model.modules() for attr, p in module._parameters.items() if p is param]


def _module_deltas(lm: LoadedModel, name: str, delta: Delta) -> list[_ModuleDelta]:
    params = dict(lm.model.named_parameters())
    if name not in params:
        raise EditError(f"edit does not fit {lm.spec!r}: the model has no parameter {name}")
    param = params[name]
    device, dtype = param.device, param.dtype
    dense = None if delta.dense is None else delta.dense.to(device, dtype)
    u = None if delta.u is None else delta.u.to(device, dtype)
    v = None if delta.v is None else delta.v.to(device, dtype)
    out = []
    for module, attr in _users_of(lm.model, param):
        if attr == "bias" and dense is not None and dense.dim() == 1:
            op = "bias"
        elif attr == "weight" and isinstance(module, nn.Embedding):
            op = "embedding"
        elif attr == "weight" and isinstance(module, nn.Linear):
            op = "linear"
        elif attr == "weight" and is_transposed_linear(module):
            op = "conv1d"
        else:
            raise EditError(f"parameter {name} ({type(module).__name__}.{attr}) cannot be applied per request; "
                            "serve a merged model instead (personaedit merge)")
        out.append(_ModuleDelta(module, op, dense, u, v))
    return out


@dataclass
class PreparedEdit:
    """An edit split by kind, with its weight deltas on the model's device and dtype (prepared once)."""

    edit: Edit
    interventions: list[tuple[Intervention, float]] = field(default_factory=list)
    weight_changes: list[tuple[_ModuleDelta, float]] = field(default_factory=list)
    context_parts: list[tuple[Edit, float]] = field(default_factory=list)

    @classmethod
    def of(cls, lm: LoadedModel, edit: Edit) -> "PreparedEdit":
        """Split `edit` (at strength 1; `row_edits` scales by each row's strength)."""
        edit.check_fits(lm)
        prepared = cls(edit)
        for part, strength in flatten(edit, 1.0):
            if isinstance(part, ActivationEdit):
                prepared.interventions += [(item, strength) for item in part.interventions]
            elif isinstance(part, WeightEdit):
                for name, delta in part.deltas.items():
                    prepared.weight_changes += [(change, strength) for change in _module_deltas(lm, name, delta)]
            elif isinstance(part, (ContextEdit, RoutedEdit)):
                prepared.context_parts.append((part, strength))
            else:
                raise EditError(f"a {part.kind} edit cannot be served per request")
        return prepared

    def context_entries(self, strength: float) -> list[Any]:
        """Objects with `context_for(prompt) -> Context`, as the context edits would place in `lm.context_providers`."""
        entries: list[Any] = []
        for part, weight in self.context_parts:
            acting = strength * weight
            if isinstance(part, ContextEdit):
                context = part.context_at(acting)
                if context is not None:
                    entries.append(_FixedContext(context))
            elif acting != 0 and part.topics and part.persona is not None:
                entries.append(Router(part, part.persona.scaled(acting), scope_encoder(part.encoder)))
        return entries


@dataclass(frozen=True)
class _FixedContext:
    context: Any

    def context_for(self, prompt: str):
        return self.context.for_message(prompt)


def _row_mask(rows: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(batch, dtype=torch.bool, device=device)
    mask[list(rows)] = True
    return mask


def _masked(fn, mask: torch.Tensor):
    """Run the whole-batch hook body `fn`, keep its result on the masked rows only."""

    def on_rows(hidden: torch.Tensor) -> torch.Tensor:
        changed = fn(hidden)
        return torch.where(mask.view(-1, *([1] * (hidden.dim() - 1))), changed, hidden)

    return on_rows


def _row_add(change: _ModuleDelta, strength: float, rows: torch.Tensor, batch: int):
    """A forward hook adding strength · change(input) to the output rows in `rows` only."""

    def hook(_module, args, output):
        inputs, out = args[0], output
        if out.dim() == 2 and out.shape[0] != batch:  # OPT's MLP sees [batch·seq, width]
            inputs, out = inputs.view(batch, -1, inputs.shape[-1]), out.view(batch, -1, out.shape[-1])
        delta = (strength * change.change(inputs.index_select(0, rows))).to(out.dtype)
        return out.index_add(0, rows, delta).view(output.shape)

    return hook


@contextlib.contextmanager
def row_edits(lm: LoadedModel, assignments: Sequence[tuple[PreparedEdit, float] | None]) -> Iterator[None]:
    """Within this block, row i of a batch of len(assignments) runs under assignments[i] (edit, strength)
    and rows given None run the unchanged model. Hooks are removed on exit, also on errors."""
    batch = len(assignments)
    groups: dict[tuple[int, float], tuple[PreparedEdit, float, list[int]]] = {}
    for row, assigned in enumerate(assignments):
        if assigned is not None and assigned[1] != 0:
            prepared, strength = assigned
            groups.setdefault((id(prepared), strength), (prepared, strength, []))[2].append(row)
    handles = []
    try:
        for prepared, strength, rows in groups.values():
            mask = _row_mask(rows, batch, lm.device)
            index = torch.tensor(rows, dtype=torch.long, device=lm.device)
            for item, weight in prepared.interventions:
                if strength * weight != 0:
                    body = _intervene(item, strength * weight)
                    handles.append(hook_site(lm.arch, item.point, item.layer, _masked(body, mask)))
            for change, weight in prepared.weight_changes:
                if strength * weight != 0:
                    handles.append(change.module.register_forward_hook(_row_add(change, strength * weight, index, batch)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def conversation(messages: Sequence[dict[str, str]], providers: Sequence[Any]) -> list[dict[str, str]]:
    """`messages` (a chat request) under context-edit entries, laid out as `build_messages` lays out one
    prompt: the edits' system prompts first (joined with the request's own), then their demonstrations,
    then the request's turns. Entries choose their context by the last user message."""
    if not providers:
        return [dict(m) for m in messages]
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    chosen = [entry.context_for(last_user) for entry in providers]
    systems = [c.system for c in chosen if c.system] + [m["content"] for m in messages if m["role"] == "system"]
    out: list[dict[str, str]] = [{"role": "system", "content": "\n\n".join(systems)}] if systems else []
    for context in chosen:
        for question, answer in context.demonstrations:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out + [dict(m) for m in messages if m["role"] != "system"]
