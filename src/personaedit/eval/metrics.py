"""Measures (METHODS.md "Measures"): coherence, PersonalityEdit ES/DD/Acc/TPEI/PAE, capability (perplexity,
KL to the base model), controllability correlations and PALETTE rates. The answer log-probabilities they
read come from models/scoring.py.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch

from personaedit.errors import PersonaEditError
from personaedit.models.generation import generate
from personaedit.models.loading import LoadedModel
from personaedit.models.scoring import answer_logprobs, answer_next_token_logprobs, in_batches, token_logits
from personaedit.progress import Progress

if TYPE_CHECKING:
    from personaedit.edits import Edit

Pair = tuple[str, str]  # (question, answer text)

# --------------------------------------------------------------------------------------------- coherence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lowercase word and punctuation tokens (an nltk-free stand-in for `word_tokenize`)."""
    return _WORD.findall(text.lower())


def _entropy_bits(counts: Iterable[int]) -> float:
    freqs = np.array(list(counts), dtype=np.float64)
    if freqs.size == 0:
        return 0.0
    freqs /= freqs.sum()
    return float(-(freqs * np.log2(freqs)).sum())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over n of weight_n × Shannon entropy (bits) of the n-gram distribution, as in ROME/MEND/PersonalityEdit."""
    tokens = words(text)
    weighted = [w * _entropy_bits(Counter(zip(*(tokens[i:] for i in range(n)))).values()) for n, w in zip(ns, weights)]
    return float(np.mean(weighted)) if weighted else 0.0


def is_coherent(text: str, threshold: float = 3.5) -> bool:
    """Whether the n-gram entropy reaches `threshold` (repetitive or very short text does not)."""
    return ngram_entropy(text) >= threshold


def coherent_pairs(base_texts: Sequence[str], edited_texts: Sequence[str], threshold: float = 3.5) -> list[int]:
    """Indices of the pairs whose base and edited texts are both coherent."""
    _same_length(base_texts, edited_texts)
    return [i for i, (b, e) in enumerate(zip(base_texts, edited_texts))
            if is_coherent(b, threshold) and is_coherent(e, threshold)]


def first_line(text: str) -> str:
    """The first non-empty line of a reply."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")




# --------------------------------------------------------------------------------------------- capability

def perplexity(lm: LoadedModel, texts: Sequence[str], batch_size: int = 8,
               on_progress: Progress | None = None) -> float:
    """exp(token-weighted mean NLL) of plain `texts` (no chat template; BOS if the tokenizer adds one).
    Every position counts as generated, so an activation edit acts on the whole text."""
    encoded = [list(lm.tokenizer(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    total_nll, total_tokens, done = 0.0, 0, 0
    for chunk in in_batches(order, batch_size):
        seqs = [encoded[i] for i in chunk if len(encoded[i]) >= 2]
        if seqs:
            logits = token_logits(lm, seqs, [0] * len(seqs))
            for row, seq in enumerate(seqs):
                start = logits.shape[1] - len(seq)
                targets = torch.tensor(seq[1:], dtype=torch.long, device=logits.device)
                predicted = logits[row, start:-1].log_softmax(-1)
                total_nll -= float(predicted.gather(1, targets[:, None]).sum())
                total_tokens += len(seq) - 1
        done += len(chunk)
        if on_progress:
            on_progress(done, len(texts))
    if total_tokens == 0:
        raise ValueError("no text has two or more tokens; perplexity is undefined")
    return math.exp(total_nll / total_tokens)


def token_kl(base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) per row of two [n, vocab] log-probability tensors."""
    p = base.exp()
    terms = torch.where(p > 0, p * (base - edited), torch.zeros_like(p))
    return terms.sum(-1)


def _as_list(logprobs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [logprobs] if isinstance(logprobs, torch.Tensor) else list(logprobs)


def kl_to_base(base_logprobs: torch.Tensor | Sequence[torch.Tensor],
               edited_logprobs: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Mean per token of KL(base ‖ edited) over lists of [n, vocab] log-probability tensors (token-weighted)."""
    base, edited = _as_list(base_logprobs), _as_list(edited_logprobs)
    _same_length(base, edited)
    per_token = [token_kl(b.float(), e.float()) for b, e in zip(base, edited)]
    flat = torch.cat(per_token) if per_token else torch.empty(0)
    if flat.numel() == 0:
        raise ValueError("no tokens to compare")
    return float(flat.mean())


# --------------------------------------------------------------------------------------------- PersonalityEdit

def token_mean(logprobs: Sequence[torch.Tensor]) -> float:
    """Token-weighted mean of per-token log-probabilities over several texts."""
    flat = torch.cat([t.flatten().float() for t in logprobs]) if logprobs else torch.empty(0)
    if flat.numel() == 0:
        raise ValueError("no answer tokens")
    return float(flat.mean())


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def edit_success(target_edited: float, other_edited: float, target_base: float) -> float:
    """ES = sigmoid(target_edited − other_edited) × min(1, exp(target_edited − target_base)), on mean log-probs."""
    gain = target_edited - target_base
    return _sigmoid(target_edited - other_edited) * (1.0 if gain >= 0 else math.exp(gain))


def drawdown(base_rows: Sequence[torch.Tensor], edited_rows: Sequence[torch.Tensor]) -> float:
    """DD: mean over texts of the mean per answer token of KL(base ‖ edited); texts without tokens are skipped."""
    _same_length(base_rows, edited_rows)
    per_text = [float(token_kl(b.float(), e.float()).mean()) for b, e in zip(base_rows, edited_rows) if b.shape[0]]
    if not per_text:
        raise ValueError("no answer tokens")
    return float(np.mean(per_text))


def _targets(target: int | Sequence[int], n: int) -> np.ndarray:
    return np.full(n, target, dtype=np.int64) if np.isscalar(target) else np.asarray(target, dtype=np.int64)


def accuracy(probs: np.ndarray | Sequence[Sequence[float]], target: int | Sequence[int]) -> float:
    """Share of answers whose top class (trait column) is the target."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError("probs must be a non-empty [n_answers, n_traits] array")
    return float(np.mean(probs.argmax(1) == _targets(target, probs.shape[0])))


def tpei(base_probs: np.ndarray | Sequence[Sequence[float]], edited_probs: np.ndarray | Sequence[Sequence[float]],
         target: int | Sequence[int], eps: float = 1e-12) -> float:
    """TPEI: mean over pairs of CE(classifier(base answer), target) − CE(classifier(edited answer), target)."""
    base, edited = np.asarray(base_probs, dtype=np.float64), np.asarray(edited_probs, dtype=np.float64)
    if base.shape != edited.shape or base.ndim != 2 or base.shape[0] == 0:
        raise ValueError("base and edited probs must be non-empty [n_answers, n_traits] arrays of one shape")
    rows, cols = np.arange(base.shape[0]), _targets(target, base.shape[0])
    ce_base = -np.log(np.clip(base[rows, cols], eps, 1.0))
    ce_edited = -np.log(np.clip(edited[rows, cols], eps, 1.0))
    return float(np.mean(ce_base - ce_edited))


def pae(base_ratings: Sequence[float], edited_ratings: Sequence[float]) -> float:
    """PAE: mean of (edited rating − base rating), ratings on a 1–5 scale."""
    _same_length(base_ratings, edited_ratings)
    base, edited = np.asarray(base_ratings, dtype=np.float64), np.asarray(edited_ratings, dtype=np.float64)
    if base.size == 0:
        raise ValueError("no ratings")
    if ((base < 1) | (base > 5) | (edited < 1) | (edited > 5)).any():
        raise ValueError("ratings must lie in [1, 5]")
    return float(np.mean(edited - base))


def measure_es(lm: LoadedModel, edit: "Edit", target: Sequence[Pair], other: Sequence[Pair], *,
               strength: float = 1.0, system: str | None = None, batch_size: int = 8) -> float:
    """ES of `edit` on `lm`: `target` pairs hold target-trait texts, `other` pairs the other traits' texts."""
    def mean_lp(pairs: Sequence[Pair]) -> float:
        return token_mean(answer_logprobs(lm, [q for q, _ in pairs], [a for _, a in pairs], system=system,
                                          batch_size=batch_size))

    target_base = mean_lp(target)
    with edit.apply(lm, strength):
        target_edited, other_edited = mean_lp(target), mean_lp(other)
    return edit_success(target_edited, other_edited, target_base)


def measure_dd(lm: LoadedModel, edit: "Edit", outer: Sequence[Pair], *, strength: float = 1.0,
               system: str | None = None, batch_size: int = 8) -> float:
    """DD of `edit` on `lm` over outer-topic pairs; works a batch at a time to bound memory."""
    per_text: list[float] = []
    for start in range(0, len(outer), max(1, batch_size)):
        chunk = outer[start:start + max(1, batch_size)]
        prompts, answers = [q for q, _ in chunk], [a for _, a in chunk]
        base = answer_next_token_logprobs(lm, prompts, answers, system=system, batch_size=batch_size)
        with edit.apply(lm, strength):
            edited = answer_next_token_logprobs(lm, prompts, answers, system=system, batch_size=batch_size)
        per_text += [float(token_kl(b, e).mean()) for b, e in zip(base, edited) if b.shape[0]]
    if not per_text:
        raise ValueError("no answer tokens")
    return float(np.mean(per_text))


def answer_pairs(lm: LoadedModel, edit: "Edit", questions: Sequence[str], *, strength: float = 1.0,
                 max_new_tokens: int = 60, system: str | None = None,
                 batch_size: int = 16) -> tuple[list[str], list[str]]:
    """(base replies, edited replies): greedy, first line of each."""
    base = [first_line(t) for t in generate(lm, questions, system=system, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)]
    with edit.apply(lm, strength):
        edited = [first_line(t) for t in generate(lm, questions, system=system, max_new_tokens=max_new_tokens,
                                                  batch_size=batch_size)]
    return base, edited


def text_metrics(base_texts: Sequence[str], edited_texts: Sequence[str], target: int,
                 classify: Callable[[list[str]], np.ndarray],
                 rate: Callable[[list[str]], Sequence[float]] | None = None,
                 threshold: float = 3.5) -> dict[str, float]:
    """Acc, TPEI (and PAE when `rate` is given) over the coherent pairs. `classify` maps texts to
    [n, n_traits] probabilities with `target` as a column index; `rate` maps texts to 1–5 target-fit ratings."""
    keep = coherent_pairs(base_texts, edited_texts, threshold)
    result = {"pairs": float(len(base_texts)), "coherent": float(len(keep)),
              "acc": math.nan, "tpei": math.nan, "pae": math.nan}
    if not keep:
        return result
    base, edited = [base_texts[i] for i in keep], [edited_texts[i] for i in keep]
    base_probs, edited_probs = np.asarray(classify(base)), np.asarray(classify(edited))
    result["acc"] = accuracy(edited_probs, target)
    result["tpei"] = tpei(base_probs, edited_probs, target)
    if rate is not None:
        result["pae"] = pae(rate(base), rate(edited))
    return result


# --------------------------------------------------------------------------------------------- controllability

def _stats():
    try:
        import scipy.stats
    except ImportError as exc:  # pragma: no cover - scipy ships with the usual installs
        raise PersonaEditError("correlations need scipy: pip install scipy") from exc
    return scipy.stats


def _finite(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    _same_length(x, y)
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _degenerate(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r over the finite pairs; 0.0 when fewer than two pairs or either side is constant."""
    a, b = _finite(x, y)
    return 0.0 if _degenerate(a, b) else float(_stats().pearsonr(a, b)[0])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ over the finite pairs; 0.0 when fewer than two pairs or either side is constant."""
    a, b = _finite(x, y)
    return 0.0 if _degenerate(a, b) else float(_stats().spearmanr(a, b)[0])


# --------------------------------------------------------------------------------------------- PALETTE

def expression_rate(shares: Sequence[float], threshold: float = 0.5) -> float:
    """Share of replies whose target-pole share (judge, 0–1) exceeds `threshold`."""
    values = np.asarray(shares, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no replies")
    return float(np.mean(values > threshold))


def win_rate(preferences: Sequence[int]) -> float:
    """(wins + ties / 2) / n for preferences +1 (edited preferred), −1 (base preferred), 0 (tie)."""
    values = list(preferences)
    if not values:
        raise ValueError("no preferences")
    if any(v not in (-1, 0, 1) for v in values):
        raise ValueError("preferences must be +1, -1 or 0")
    return (values.count(1) + values.count(0) / 2) / len(values)
