"""The texts the trait-specific judge is fitted and measured on (issue 13), and each dimension's three-way labels:
its own texts high/low, every other dimension's and the neutral texts "none", its counterpart's left out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from personaedit.data import records
from personaedit.eval.text_judge import first_pole

HIGH, LOW, NONE = 0, 1, 2
# MBTI/Big Five counterparts (McCrae & Costa 1989): a text expressing one does express the other
COUNTERPART = {"extraversion": "ei", "openness": "sn", "agreeableness": "tf", "conscientiousness": "jp"}
COUNTERPART.update({axis: trait for trait, axis in list(COUNTERPART.items())})



@dataclass
class TextSet:
    """Texts with the dimension each expresses (None: neutral text) and its pole (1 = high / first letter)."""

    texts: list[str]
    dims: list[str | None]
    poles: list[int | None]

    def __add__(self, other: "TextSet") -> "TextSet":
        return TextSet(self.texts + other.texts, self.dims + other.dims, self.poles + other.poles)

    def __len__(self) -> int:
        return len(self.texts)


def _rows(rows: Sequence[Mapping[str, Any]], key: str) -> TextSet:
    dims = [r[key] for r in rows]
    return TextSet([r["text"] for r in rows], dims, [int(r["pole"] == first_pole(d)) for r, d in zip(rows, dims)])


def _neutral(split: str) -> TextSet:
    texts = [r["text"] for r in records("neutral_text", split)] + [r["question"] for r in records("neutral_questions", split)]
    return TextSet(texts, [None] * len(texts), [None] * len(texts))


def split_texts(split: str) -> TextSet:
    """Big Five texts (opinions; on train also trait_texts), mbti_texts and the neutral texts of a split."""
    big_five = records("opinions", split) + (records("trait_texts", split) if split == "train" else [])
    return _rows(big_five, "trait") + _rows(records("mbti_texts", split), "axis") + _neutral(split)


def check_texts() -> TextSet:
    """judge_check: the reply texts (not the friend's messages) of every dimension; it holds no neutral text."""
    rows = records("judge_check")
    return TextSet([r["text"] for r in rows], [r["trait"] for r in rows],
                   [int(r["pole"] == first_pole(r["trait"])) for r in rows])


def labels(dim: str, data: TextSet) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, classes HIGH/LOW/NONE) of `dim`'s three-way task; its counterpart's texts are left out."""
    rows, ys = [], []
    for i, (d, pole) in enumerate(zip(data.dims, data.poles)):
        if d == dim:
            rows.append(i)
            ys.append(HIGH if pole == 1 else LOW)
        elif d is None or d != COUNTERPART.get(dim):
            rows.append(i)
            ys.append(NONE)
    return np.array(rows, dtype=int), np.array(ys, dtype=int)
