"""What personality vectors look like: norms per layer and cosine similarity between vectors,
computed one parameter at a time (a vector is never held in memory whole)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from personaedit.merge.engine import VectorFile
from personaedit.models.arch import LAYOUTS_BY_MODEL_TYPE

OTHER = "other"


def layer_of(name: str, model_type: Optional[str] = None) -> Optional[int]:
    """The decoder layer a parameter belongs to, from the layer paths in `models/arch.py`'s layouts."""
    layouts = [LAYOUTS_BY_MODEL_TYPE[model_type]] if model_type in LAYOUTS_BY_MODEL_TYPE else list(LAYOUTS_BY_MODEL_TYPE.values())
    for layout in layouts:
        match = re.match(re.escape(layout.layers) + r"\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


@dataclass(frozen=True)
class VectorSummary:
    path: Path
    method: str
    persona: Optional[dict]
    made_for: Optional[str]
    parameters: int
    low_rank: int  # parameters stored as factors u vᵀ
    norm: float  # Frobenius norm of the whole vector (times its scale)
    layer_norms: dict[str, float]  # layer index as text, or "other" (embeddings, final norm, head)


def summarise(path: str | Path) -> VectorSummary:
    """Per-layer and total norms of one vector."""
    vector = VectorFile.open(path)
    try:
        model_type = vector.base.model_type if vector.base else None
        squares: dict[str, float] = {}
        for name in vector.shapes:
            layer = layer_of(name, model_type)
            where = OTHER if layer is None else str(layer)
            squares[where] = squares.get(where, 0.0) + float(vector.delta(name, torch.float64).square().sum())
        ordered = sorted(squares, key=lambda k: (k == OTHER, int(k) if k != OTHER else 0))
        return VectorSummary(
            path=Path(path),
            method=vector.method,
            persona=vector.persona,
            made_for=vector.base.spec if vector.base else None,
            parameters=len(vector.shapes),
            low_rank=sum(rank is not None for rank in vector.ranks.values()),
            norm=math.sqrt(sum(squares.values())),
            layer_norms={k: math.sqrt(squares[k]) for k in ordered},
        )
    finally:
        vector.close()


def cosine_matrix(paths: list[str | Path]) -> list[list[float]]:
    """cos(φ_i, φ_j) over all parameters; a parameter one vector lacks counts as zeros there."""
    vectors = [VectorFile.open(p) for p in paths]
    try:
        n = len(vectors)
        gram = torch.zeros(n, n, dtype=torch.float64)
        names = sorted({name for v in vectors for name in v.shapes})
        for name in names:
            holders = [i for i, v in enumerate(vectors) if name in v.shapes]
            flats = [vectors[i].delta(name, torch.float64).reshape(-1) for i in holders]
            for a, i in enumerate(holders):
                for b in range(a, len(holders)):
                    dot = float(flats[a] @ flats[b])
                    gram[i, holders[b]] += dot
                    if b != a:
                        gram[holders[b], i] += dot
        norms = gram.diagonal().sqrt()
        denom = torch.outer(norms, norms)
        cos = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
        return cos.tolist()
    finally:
        for vector in vectors:
            vector.close()
