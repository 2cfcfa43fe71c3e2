"""Personality vectors: φ = θ_fine-tuned − θ_base, trained on dialogue in one persona, saved as a WeightEdit.

The names below load their modules (and torch) when first used, so that `vectors.options` stays light for the
command line. (`vectors.distill` is the module; its function is `vectors.distill.distill`.)"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Example": "distill", "big5_chat_examples": "distill", "training_questions": "distill",
    "TrainedVector": "train", "train_vector": "train", "TrainOptions": "options",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'personaedit.vectors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"personaedit.vectors.{_HOMES[name]}"), name)
