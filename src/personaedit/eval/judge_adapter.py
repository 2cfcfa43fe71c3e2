"""A LoRA adapter on the text judge's encoder, trained jointly with temporary pole heads.

The adapter (peft LoRA on MiniLM's attention projections) is trained on the judge's training texts: each
text's judge features (mean+max of layers 1-6, as in text_judge) go through a linear pole head for its own
dimension (binary cross-entropy, classes and dimensions weighed equally) and, for Big Five texts, a linear
5-way trait head. After every epoch the temporary heads score the validation split; the epoch with the best
mean Big Five validation accuracy is kept (early stopping), and the judge's real heads are then refitted on
the adapted features as before (convex, L2 chosen on validation). The adapter is merged into the encoder for
scoring, so the adapted judge runs at the frozen judge's speed. Deterministic for a seed on one machine:
shuffling and initialisation draw from seeded generators, dropout is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from personaedit.fileio import atomic_path
from personaedit.models.encoders import AdapterConfig
from personaedit.progress import Progress

ADAPTER_FORMAT = 1


def pooled_features(hidden_states: Sequence[Any], attention_mask: Any, layers: Sequence[int]) -> Any:
    """Judge features of a batch as a torch tensor [b, 2·len(layers)·h] (differentiable): see models/encoders.FEATURES."""
    import torch

    mask = attention_mask[:, :, None].to(hidden_states[0].dtype)
    blocks = []
    for layer in layers:
        states = hidden_states[layer]
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        peak = states.masked_fill(mask == 0, float("-inf")).amax(1)
        blocks += [mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-12),
                   peak / peak.norm(dim=-1, keepdim=True).clamp(min=1e-12)]
    return torch.cat(blocks, dim=-1)


def save_adapter(model: Any, path: str | Path) -> None:
    """Write the LoRA weights of a peft-wrapped encoder (safetensors, atomically)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in sorted(get_peft_model_state_dict(model).items())}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata={"format": str(ADAPTER_FORMAT)})


@dataclass
class Example:
    text: str
    dimension: int  # index in DIMENSIONS
    label: int  # 1 = high pole / first letter
    trait: int  # index in TRAITS, −1 for MBTI texts


def examples(sets: Mapping[str, tuple[list[str], np.ndarray]], dimensions: Sequence[str],
             traits: Sequence[str]) -> list[Example]:
    """Training rows from split_sets-style pole sets (trait labels from the dimension when it is a trait)."""
    out = []
    for d, dim in enumerate(dimensions):
        texts, labels = sets[dim]
        trait = list(traits).index(dim) if dim in traits else -1
        out += [Example(t, d, int(y), trait) for t, y in zip(texts, labels)]
    return out


class AdapterTrainer:
    """Joint training of the LoRA adapter and temporary linear heads on judge features."""

    def __init__(self, encoder: Any, config: AdapterConfig, layers: Sequence[int], n_dims: int, n_traits: int) -> None:
        import torch
        from peft import get_peft_model

        torch.manual_seed(config.seed)  # LoRA A matrices are drawn at wrapping time
        self.config, self.layers = config, tuple(layers)
        self.tokenizer, self.device = encoder.tokenizer, encoder.device
        self.model = get_peft_model(encoder.model, config.lora())
        width = 2 * len(self.layers) * encoder.model.config.hidden_size
        self.pole = torch.nn.Linear(width, n_dims).to(self.device)
        self.trait = torch.nn.Linear(width, n_traits).to(self.device)
        for layer in (self.pole, self.trait):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        self.shift = torch.zeros(width, device=self.device)
        self.scale = torch.ones(width, device=self.device)

    def _features(self, texts: Sequence[str], grad: bool) -> Any:
        import torch

        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                               return_tensors="pt").to(self.device)
        with torch.set_grad_enabled(grad):
            states = self.model(**batch, output_hidden_states=True).hidden_states
            return (pooled_features(states, batch["attention_mask"], self.layers) - self.shift) / self.scale

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Adapted features (not standardised) of texts, eval mode, as in SentenceEncoder.features."""
        import torch

        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                out.append((self._features(texts[start:start + 64], False) * self.scale + self.shift).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.shift.numel()), np.float32)

    def predict(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Temporary heads' (pole logits [n, dims], trait logits [n, traits])."""
        import torch

        self.model.eval()
        poles, traits = [], []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                z = self._features(texts[start:start + 64], False)
                poles.append(self.pole(z).cpu().numpy())
                traits.append(self.trait(z).cpu().numpy())
        return np.concatenate(poles), np.concatenate(traits)

    def train(self, rows: Sequence[Example], score: Callable[["AdapterTrainer"], float],
              on_progress: Progress | None = None) -> dict[str, Any]:
        """Train for config.epochs, keep the epoch whose `score` (higher is better) is best; return the trace."""
        import torch

        cfg = self.config
        frozen = torch.from_numpy(self.features([r.text for r in rows]))
        self.shift = frozen.mean(0).to(self.device)
        self.scale = (frozen.std(0) + 1e-6).to(self.device)
        dims = torch.tensor([r.dimension for r in rows], device=self.device)
        labels = torch.tensor([float(r.label) for r in rows], device=self.device)
        traits = torch.tensor([r.trait for r in rows], device=self.device)
        # weight 1/(count of the row's (dimension, pole) group): every group carries the same total weight
        group = dims * 2 + labels.long()
        weight = 1.0 / torch.bincount(group).float()[group]
        trait_rows = traits >= 0
        trait_weight = torch.where(trait_rows, 1.0 / torch.bincount(traits[trait_rows]).float()[traits.clamp(min=0)], 0.0)
        weight, trait_weight = weight / weight.sum(), trait_weight / trait_weight.sum()

        lora = [p for p in self.model.parameters() if p.requires_grad]
        heads = [*self.pole.parameters(), *self.trait.parameters()]
        optimiser = torch.optim.AdamW([{"params": lora, "lr": cfg.lr, "weight_decay": 0.0},
                                       {"params": heads, "lr": cfg.head_lr, "weight_decay": 0.0}])
        generator = torch.Generator().manual_seed(cfg.seed)
        steps = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
        trace: dict[str, Any] = {"epoch_score": [], "epoch_loss": []}
        best = (score(self), 0, self._snapshot())
        trace["epoch_score"].append(best[0])
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            order = torch.randperm(len(rows), generator=generator).tolist()
            total = 0.0
            for step in range(steps):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                z = self._features([rows[i].text for i in idx], True)
                pole_logit = self.pole(z).gather(1, dims[idx, None])[:, 0]
                pole_loss = torch.nn.functional.binary_cross_entropy_with_logits(pole_logit, labels[idx], reduction="none")
                trait_loss = torch.nn.functional.cross_entropy(self.trait(z), traits[idx].clamp(min=0), reduction="none")
                # batch losses scaled so that one epoch sums to the weighted mean over all rows
                loss = len(rows) / len(idx) * ((weight[idx] * pole_loss).sum() + (trait_weight[idx] * trait_loss).sum())
                loss = loss + 0.5 * cfg.head_l2 * (self.pole.weight.square().sum() + self.trait.weight.square().sum())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
                if on_progress is not None:
                    on_progress((epoch - 1) * steps + step + 1, cfg.epochs * steps)
            trace["epoch_loss"].append(total / steps)
            value = score(self)
            trace["epoch_score"].append(value)
            if value > best[0]:
                best = (value, epoch, self._snapshot())
        self._restore(best[2])
        trace["best_epoch"] = best[1]
        return trace

    def _snapshot(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {"lora": {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()},
                "pole": {k: v.detach().clone() for k, v in self.pole.state_dict().items()},
                "trait": {k: v.detach().clone() for k, v in self.trait.state_dict().items()}}

    def _restore(self, snap: Mapping[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, snap["lora"])
        self.pole.load_state_dict(snap["pole"])
        self.trait.load_state_dict(snap["trait"])
