"""What `train_vector` (and `personaedit vector train`, whose flags are these fields) can be told: the data, the
adapter, the optimiser and the checkpoints of a personality vector's fine-tune."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personaedit.option_groups import option


@dataclass(frozen=True)
class TrainOptions:
    """The options of a personality vector's training run (an option group, see option_groups.py)."""

    big5_chat: Path | None = option(None, "Train on this Big5-Chat CSV instead of distilled answers.")
    limit: int = option(64, "Training questions (or Big5-Chat rows) to use; 0 = all.", min=0)
    samples_per_question: int = option(1, "Distilled answers per question.", min=1)
    max_new_tokens: int = option(64, "Length of distilled answers.", min=1)
    prompt_strength: float = option(1.5, "Persona prompt strength for distillation.")
    lora_rank: int = option(8, "LoRA rank; 0 = full fine-tuning (dense vector).", min=0)
    lora_alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / rank.")
    target_modules: str = option("all-linear", "peft target modules (LoRA).")
    epochs: float = option(2.0, "Passes over the training examples.", min=0.0)
    learning_rate: float | None = option(None, "Default 2e-3 (LoRA) or 2e-5 (full).", flag="--lr")
    batch_size: int = option(8, "Examples per optimiser step over all processes (the global batch).", min=1)
    grad_accumulation: int = option(1, "Batches whose gradients are accumulated before each optimiser step.", min=1)
    max_length: int = option(256, "Tokens per example (question + answer).", min=8)
    save_steps: int = option(10, "Checkpoint every N optimiser steps.", min=1)
    seed: int = option(0, "Seed of the question draw, the distilled samples, LoRA's initialisation and the data order.")

    @property
    def full(self) -> bool:
        """Full fine-tuning (a dense vector) rather than LoRA."""
        return self.lora_rank <= 0
