"""φ = θ_ft − θ_base of a fine-tuned copy: low-rank factors of every LoRA layer, or the dense differences after
full fine-tuning, as a weight edit's deltas in each parameter's own layout."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from personaedit.edits import Delta


def lora_deltas(peft_model: Any, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Delta]:
    """ΔW = scaling·B@A of every LoRA layer as factors in the wrapped parameter's layout. The factors are read
    from `state`, the peft model's whole state dict (gathered from the shards of FSDP or ZeRO-3), when given,
    else from the layers themselves."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Delta] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if state is None:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        else:
            a, b = (state[f"base_model.model.{name}.lora_{x}.default.weight"] for x in "AB")
        a = a.detach().float().cpu()  # [r, in]
        b = b.detach().float().cpu() * module.scaling["default"]  # [out, r]
        # Conv1D (GPT-2) stores weights as [in, out]: ΔW_param = (bA)ᵀ = Aᵀ bᵀ.
        u, v = (a.T, b) if module.fan_in_fan_out else (b, a.T)
        deltas[f"{name}.weight"] = Delta(u=u.contiguous(), v=v.contiguous())
    return deltas


def dense_deltas(tuned: torch.nn.Module | Mapping[str, torch.Tensor], base: torch.nn.Module) -> dict[str, Delta]:
    """θ_ft − θ_base of every parameter that changed; `tuned` is the fine-tuned model or its whole state dict
    (gathered from shards). Each difference is taken on the CPU, so the two may live on any devices."""
    tuned_params = tuned if isinstance(tuned, Mapping) else dict(tuned.named_parameters())
    deltas = {}
    for name, param in base.named_parameters():
        diff = tuned_params[name].detach().float().cpu() - param.detach().float().cpu()
        if diff.any():
            deltas[name] = Delta(dense=diff)
    return deltas
