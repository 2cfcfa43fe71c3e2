"""Inventory self-report (MPI style): the model rates questionnaire statements about itself.

Big Five: the IPIP-NEO-120 items (public domain, shipped in the PyPI package `ffm`), each asked as
"Statement: You {item}." with five options (A) Very Accurate ... (E) Very Inaccurate. MBTI-style axes:
the project's forced-choice items (package data `mbti_items`) with two options (A)/(B).

Big Five items are scored one of two ways (`scoring`):
- "agreement" (default): "Is the statement an accurate description of you? Reply Yes or No." and the
  next-token probabilities of " Yes" and " No" after "Answer:"; an item scores 1 + 4 p(yes) with p
  renormalised over the two words. Small models pick option *letters* by position (SmolLM2-135M read
  3.0 +- 0.03 on every trait, whatever the persona), but they do answer yes or no by the statement's
  content; a yes-saying bias cancels over each trait's reverse-keyed items.
- "letters": the five Likert options as letters, read after "Answer: (": the expected score under the
  renormalised letter probabilities and the score of the most likely letter, each averaged over the
  normal and the reversed option order (cancels position bias).
Reverse-keyed items score 6 - s. Everything the caller put in force (context, activation and
weight edits) applies, since prompts go through the same chat rendering and forward pass as generation.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.eval.ipip import Item, ipip_neo_120
from personaedit.models.generation import build_messages, render_chat
from personaedit.models.loading import LoadedModel
from personaedit.models.scoring import option_probabilities
from personaedit.persona import BIG_FIVE, MBTI
from personaedit.progress import Progress


LIKERT_LABELS = ("Very Accurate", "Moderately Accurate", "Neither Accurate Nor Inaccurate",
                 "Moderately Inaccurate", "Very Inaccurate")  # scores 5, 4, 3, 2, 1
LIKERT_LETTERS = ("A", "B", "C", "D", "E")
MBTI_LETTERS = ("A", "B")
LIKERT_INSTRUCTION = ("Read the statement and choose the option that shows how accurately it describes you. "
                      "Reply with the letter of one option.")
MBTI_INSTRUCTION = "Read the question and choose the option that describes you better. Reply with A or B."
ANSWER_PREFIX = "Answer: ("
AGREEMENT_INSTRUCTION = "Is the statement an accurate description of you? Reply Yes or No."
AGREEMENT_PREFIX = "Answer:"
AGREEMENT_WORDS = (" Yes", " No")
AGREEMENT_WORDS_UNSPACED = ("Yes", "No")  # for a vocabulary where both spaced words start with the same token
SCORINGS = ("agreement", "letters")


# --------------------------------------------------------------------------------------------- prompts

def likert_options(reversed_order: bool = False) -> list[tuple[str, str, int]]:
    """(letter, label, score) per option; normal order (A) Very Accurate = 5, reversed (A) Very Inaccurate = 1."""
    labels = list(zip(LIKERT_LABELS, (5, 4, 3, 2, 1)))
    if reversed_order:
        labels.reverse()
    return [(letter, label, score) for letter, (label, score) in zip(LIKERT_LETTERS, labels)]


def likert_prompt(item: Item, reversed_order: bool = False) -> str:
    """The user message for one IPIP item."""
    options = "\n".join(f"({letter}) {label}" for letter, label, _ in likert_options(reversed_order))
    return f"{LIKERT_INSTRUCTION}\nStatement: {item.statement}\nOptions:\n{options}"


def mbti_prompt(row: Mapping[str, Any], swapped: bool = False) -> str:
    """The user message for one forced-choice MBTI item (`swapped`: option_b is shown as (A))."""
    first, second = (row["option_b"], row["option_a"]) if swapped else (row["option_a"], row["option_b"])
    return f"{MBTI_INSTRUCTION}\nQuestion: {row['question']}\n(A) {first}\n(B) {second}"


def agreement_prompt(item: Item) -> str:
    """The user message for one IPIP item under agreement scoring."""
    return f"{AGREEMENT_INSTRUCTION}\nStatement: {item.statement}"


def scoring_text(lm: LoadedModel, prompt: str, prefix: str = ANSWER_PREFIX) -> tuple[str, bool]:
    """(text, uses_template): `prompt` as a chat under the context edits in force, with the assistant turn
    begun by `prefix` ('Answer: (' so that the next token is an option letter, or 'Answer:' before a word)."""
    text, uses_template = render_chat(lm.tokenizer, build_messages(lm, prompt))
    return text + ("" if uses_template else " ") + prefix, uses_template


def option_token_ids(tokenizer, text: str, letters: Sequence[str], add_special_tokens: bool) -> list[int]:
    """The token id of each letter as it follows `text` (checked: text + letter = text's tokens + one)."""
    base = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ids = []
    for letter in letters:
        extended = tokenizer(text + letter, add_special_tokens=add_special_tokens)["input_ids"]
        if len(extended) != len(base) + 1 or extended[:-1] != base:
            raise PersonaEditError(f"this tokenizer does not encode option letter {letter!r} as one token after "
                                   f"{ANSWER_PREFIX!r}; the inventory cannot be scored from next-token probabilities")
        ids.append(extended[-1])
    if len(set(ids)) != len(ids):
        raise PersonaEditError("this tokenizer maps different option letters to the same token")
    return ids


def word_token_ids(tokenizer, text: str, words: Sequence[str], add_special_tokens: bool) -> list[int]:
    """The first token of each word as it follows `text` (a word may span several tokens in a small
    vocabulary; its first token stands for it), checked distinct."""
    base = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ids = []
    for word in words:
        extended = tokenizer(text + word, add_special_tokens=add_special_tokens)["input_ids"]
        if len(extended) <= len(base) or extended[:len(base)] != base:
            raise PersonaEditError(f"this tokenizer merges {word!r} into the text before it; the inventory cannot "
                                   "be scored from next-token probabilities")
        ids.append(extended[len(base)])
    if len(set(ids)) != len(ids):
        raise PersonaEditError(f"this tokenizer starts {' and '.join(map(repr, words))} with the same token")
    return ids


# ---------------------------------------------------------------------------------- pure scoring steps

def _renormalised(probs: Sequence[float]) -> list[float]:
    total = float(sum(probs))
    if total <= 0:
        return [1.0 / len(probs)] * len(probs)
    return [float(p) / total for p in probs]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def likert_score(normal: Sequence[float], reversed_: Sequence[float], reverse_keyed: bool) -> tuple[float, float]:
    """(expected, argmax) item score in [1, 5] from the letter probabilities (A..E) under the normal order
    ((A) Very Accurate = 5) and the reversed order ((A) Very Inaccurate = 1): each order's expected score
    under the renormalised probabilities and the score of its most likely letter, averaged over the two
    orders; a reverse-keyed item scores 6 - s."""
    expected, argmax = [], []
    for probs, reversed_order in ((normal, False), (reversed_, True)):
        scores = [score for _, _, score in likert_options(reversed_order)]
        p = _renormalised(probs)
        expected.append(sum(pi * s for pi, s in zip(p, scores)))
        argmax.append(scores[_argmax(p)])
    e, a = sum(expected) / 2, sum(argmax) / 2
    return (6 - e, 6 - a) if reverse_keyed else (e, a)


def agreement_score(p_yes: float, p_no: float, reverse_keyed: bool) -> tuple[float, float]:
    """(expected, argmax) item score in [1, 5]: 1 + 4 p(yes) with p renormalised over yes and no, and 5 or 1
    for the likelier word (3 on a tie); a reverse-keyed item scores 6 - s."""
    total = p_yes + p_no
    share = p_yes / total if total > 0 else 0.5
    expected = 1 + 4 * share
    argmax = 3.0 if p_yes == p_no else (5.0 if p_yes > p_no else 1.0)
    return (6 - expected, 6 - argmax) if reverse_keyed else (expected, argmax)


def forced_choice_score(normal: Sequence[float], swapped: Sequence[float],
                        a_is_first_pole: bool) -> tuple[float, float]:
    """(expected, argmax) in [-1, 1] toward the axis's first pole (E, S, T, J) from the (A), (B)
    probabilities with option_a shown as (A) (`normal`) and as (B) (`swapped`): 2 p(first pole) - 1 and
    the sign of the more likely option (0 on a tie), each averaged over the two orders."""
    expected, argmax = [], []
    for probs, first_shown_as in ((normal, 0 if a_is_first_pole else 1), (swapped, 1 if a_is_first_pole else 0)):
        p = _renormalised(probs)
        p_first = p[first_shown_as]
        expected.append(2 * p_first - 1)
        argmax.append(0.0 if p[0] == p[1] else (1.0 if p_first > 0.5 else -1.0))
    return sum(expected) / 2, sum(argmax) / 2


# --------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class TraitScore:
    """A Big Five trait's inventory score: mean and std over its items (1-5), signed = (mean - 3) / 2."""

    mean: float
    std: float
    argmax_mean: float
    facets: dict[str, float]
    n_items: int

    @property
    def signed(self) -> float:
        return (self.mean - 3) / 2


@dataclass(frozen=True)
class AxisScore:
    """An MBTI axis's score in [-1, 1] (+1 = first letter: E, S, T, J), expected and argmax versions."""

    score: float
    argmax: float
    n_items: int


@dataclass(frozen=True)
class InventoryResult:
    traits: dict[str, TraitScore]
    mbti: dict[str, AxisScore]
    items: list[dict[str, Any]] = field(default_factory=list)
    mbti_items: list[dict[str, Any]] = field(default_factory=list)
    letter_mass: dict[str, float] = field(default_factory=dict)  # mean probability on the option letters

    def scores(self) -> dict[str, float]:
        """Signed scores in [-1, 1]: the Big Five traits and the MBTI axes measured."""
        return {**{t: s.signed for t, s in self.traits.items()}, **{a: s.score for a, s in self.mbti.items()}}

    @property
    def mbti_type(self) -> str:
        """Letters of the measured axes, e.g. 'ISTJ' ('x' where an axis scores exactly 0)."""
        return "".join(
            "x" if s.score == 0 else MBTI[a].pole_names[0 if s.score > 0 else 1] for a, s in self.mbti.items()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "traits": {t: {**asdict(s), "signed": s.signed} for t, s in self.traits.items()},
            "mbti": {a: asdict(s) for a, s in self.mbti.items()},
            "mbti_type": self.mbti_type,
            "letter_mass": dict(self.letter_mass),
            "items": [dict(r) for r in self.items],
            "mbti_items": [dict(r) for r in self.mbti_items],
        }


def trait_score(records_of_trait: Sequence[Mapping[str, Any]]) -> TraitScore:
    """Mean, population std, argmax mean and per-facet means of a trait's item scores."""
    expected = [r["expected"] for r in records_of_trait]
    facets: dict[str, list[float]] = {}
    for r in records_of_trait:
        facets.setdefault(r["facet"], []).append(r["expected"])
    return TraitScore(
        mean=statistics.fmean(expected),
        std=statistics.pstdev(expected),
        argmax_mean=statistics.fmean(r["argmax"] for r in records_of_trait),
        facets={f: statistics.fmean(v) for f, v in facets.items()},
        n_items=len(expected),
    )


# ------------------------------------------------------------------------------------------------- run

def run_inventory(lm: LoadedModel, *, batch_size: int = 16, traits: Sequence[str] | None = None,
                  items_per_facet: int = 4, mbti: bool = True, scoring: str = "agreement",
                  on_progress: Progress | None = None) -> InventoryResult:
    """The model's self-report on the IPIP-NEO-120 (all traits, or `traits`; the first `items_per_facet`
    of each facet's four items, for a shorter form) and, when `mbti`, on the MBTI forced-choice items,
    under whatever edits are in force on `lm`."""
    wanted = list(BIG_FIVE) if traits is None else list(traits)
    unknown = [t for t in wanted if t not in BIG_FIVE]
    if unknown:
        raise PersonaEditError(f"unknown trait(s) {', '.join(unknown)} (valid: {', '.join(BIG_FIVE)})")
    if not 1 <= items_per_facet <= 4:
        raise PersonaEditError(f"items_per_facet must be 1 to 4, not {items_per_facet}")
    if scoring not in SCORINGS:
        raise PersonaEditError(f"unknown inventory scoring {scoring!r} (valid: {', '.join(SCORINGS)})")
    items = [item for item in ipip_neo_120() if item.trait in wanted and item.number <= 30 * items_per_facet]
    mbti_rows = records("mbti_items") if mbti else []
    if scoring == "agreement":
        likert_prompts = [agreement_prompt(item) for item in items]
    else:
        likert_prompts = [likert_prompt(item, rev) for item in items for rev in (False, True)]
    mbti_prompts = [mbti_prompt(row, swap) for row in mbti_rows for swap in (False, True)]
    total = len(likert_prompts) + len(mbti_prompts)

    def progress(offset: int):
        return None if on_progress is None else (lambda done, _n: on_progress(offset + done, total))

    if scoring == "agreement":
        likert = _probabilities(lm, likert_prompts, AGREEMENT_WORDS, batch_size, progress(0), AGREEMENT_PREFIX)
        item_records = [_agreement_record(item, likert[k]) for k, item in enumerate(items)]
    else:
        likert = _probabilities(lm, likert_prompts, LIKERT_LETTERS, batch_size, progress(0))
        item_records = [_likert_record(item, likert[2 * k], likert[2 * k + 1]) for k, item in enumerate(items)]
    forced = _probabilities(lm, mbti_prompts, MBTI_LETTERS, batch_size, progress(len(likert_prompts)))
    mbti_records = [_mbti_record(row, forced[2 * k], forced[2 * k + 1]) for k, row in enumerate(mbti_rows)]
    return InventoryResult(
        traits={t: trait_score([r for r in item_records if r["trait"] == t]) for t in wanted},
        mbti=_axis_scores(mbti_records),
        items=item_records,
        mbti_items=mbti_records,
        letter_mass={name: float(p.sum(-1).mean()) for name, p in ((scoring_name(scoring), likert), ("mbti", forced))
                     if len(p)},
    )


def scoring_name(scoring: str) -> str:
    """The key of the Big Five items' option mass in `letter_mass`."""
    return "likert" if scoring == "letters" else scoring


def _probabilities(lm: LoadedModel, prompts: list[str], letters: Sequence[str], batch_size: int,
                   on_progress: Progress | None, prefix: str = ANSWER_PREFIX) -> torch.Tensor:
    if not prompts:
        return torch.zeros(0, len(letters))
    rendered = [scoring_text(lm, p, prefix) for p in prompts]
    add_special = not rendered[0][1]
    if prefix == ANSWER_PREFIX:
        ids = option_token_ids(lm.tokenizer, rendered[0][0], letters, add_special)
    else:
        try:
            ids = word_token_ids(lm.tokenizer, rendered[0][0], letters, add_special)
        except PersonaEditError:
            ids = word_token_ids(lm.tokenizer, rendered[0][0], AGREEMENT_WORDS_UNSPACED, add_special)
    return option_probabilities(lm, [text for text, _ in rendered], ids, add_special_tokens=add_special,
                                batch_size=batch_size, on_progress=on_progress)


def _likert_record(item: Item, normal: torch.Tensor, reversed_: torch.Tensor) -> dict[str, Any]:
    expected, argmax = likert_score(normal.tolist(), reversed_.tolist(), item.reverse_keyed)
    return {"number": item.number, "text": item.text, "trait": item.trait, "facet": item.facet,
            "reverse_keyed": item.reverse_keyed, "expected": expected, "argmax": argmax,
            "probs_normal": normal.tolist(), "probs_reversed": reversed_.tolist()}


def _agreement_record(item: Item, probs: torch.Tensor) -> dict[str, Any]:
    expected, argmax = agreement_score(float(probs[0]), float(probs[1]), item.reverse_keyed)
    return {"number": item.number, "text": item.text, "trait": item.trait, "facet": item.facet,
            "reverse_keyed": item.reverse_keyed, "expected": expected, "argmax": argmax,
            "probs_yes_no": probs.tolist()}


def _mbti_record(row: Mapping[str, Any], normal: torch.Tensor, swapped: torch.Tensor) -> dict[str, Any]:
    first_pole = MBTI[row["axis"]].pole_names[0]
    expected, argmax = forced_choice_score(normal.tolist(), swapped.tolist(), row["pole_a"] == first_pole)
    return {"id": row["id"], "axis": row["axis"], "score": expected, "argmax": argmax,
            "probs_normal": normal.tolist(), "probs_swapped": swapped.tolist()}


def _axis_scores(mbti_records: Sequence[Mapping[str, Any]]) -> dict[str, AxisScore]:
    axes: dict[str, AxisScore] = {}
    for axis in MBTI:
        rows = [r for r in mbti_records if r["axis"] == axis]
        if rows:
            axes[axis] = AxisScore(score=statistics.fmean(r["score"] for r in rows),
                                   argmax=statistics.fmean(r["argmax"] for r in rows), n_items=len(rows))
    return axes
