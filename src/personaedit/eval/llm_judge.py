"""An optional LLM judge over any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, ...).

Off by default and never required: the offline text judge covers every measure without it. Three prompts
(METHODS.md "Measures", eval/llm_prompts.py):

- PAE (PersonalityEdit): a 1–5 rating of how well a text fits a trait pole's adjectives;
- PALETTE expression rate: the share (0–100%) of the target pole vs the opposite pole in a reply;
- PALETTE pairwise preference: which of two replies shows the target pole more, the order of the two
  alternated item by item to cancel position bias.

The requests, their retries and the answer cache: eval/llm_client.py.
"""

from __future__ import annotations

from typing import Sequence

from personaedit.errors import PersonaEditError
from personaedit.eval.llm_client import ChatClient
from personaedit.eval.llm_prompts import (edited_shown_first, pae_messages, pairwise_messages, parse_preference,
                                          parse_rating, parse_share, preference_of_edited, resolve_pole,
                                          share_messages)
from personaedit.eval.metrics import expression_rate as _expression_rate
from personaedit.eval.metrics import pae as _pae
from personaedit.eval.metrics import win_rate as _win_rate
from personaedit.persona import Dimension
from personaedit.progress import Progress


class LLMJudge(ChatClient):
    """A judge behind an OpenAI-compatible `/chat/completions` endpoint: the three prompts and the measures
    made of them."""

    # ----------------------------------------------------------------------------------------- prompts

    def rate_pae(self, texts: Sequence[str], trait: Dimension | str, pole: str | float = "high", *,
                 on_progress: Progress | None = None) -> list[int | None]:
        """1–5 ratings of how well each text fits the adjectives of `trait`'s `pole`; None when unparseable."""
        dim, target, _ = resolve_pole(trait, pole)

        def rate(i: int, text: str) -> int | None:
            return self._parsed("pae", parse_rating(self.complete(pae_messages(text, dim, target))))

        return self._map(rate, list(texts), on_progress)

    def pole_shares(self, utterances: Sequence[str], replies: Sequence[str], dimension: Dimension | str,
                    pole: str | float, *, on_progress: Progress | None = None) -> list[float | None]:
        """For each reply to an utterance, the judge's share in [0, 1] of the target pole vs the opposite;
        None when unparseable."""
        _same_length(utterances, replies)
        dim, target, opposite = resolve_pole(dimension, pole)

        def share(i: int, item: tuple[str, str]) -> float | None:
            utterance, reply = item
            messages = share_messages(utterance, reply, dim, target, opposite)
            return self._parsed("share", parse_share(self.complete(messages)))

        return self._map(share, list(zip(utterances, replies)), on_progress)

    def pairwise(self, utterances: Sequence[str], edited_replies: Sequence[str], base_replies: Sequence[str],
                 dimension: Dimension | str, pole: str | float, *,
                 on_progress: Progress | None = None) -> list[int]:
        """Per item +1 (edited shows the pole more), -1 (base does) or 0 (tie or unparseable); the edited reply
        is A on even items and B on odd ones, so a judge that always picks one position scores 0.5."""
        _same_length(utterances, edited_replies)
        _same_length(utterances, base_replies)
        dim, target, opposite = resolve_pole(dimension, pole)

        def prefer(i: int, item: tuple[str, str, str]) -> int:
            utterance, edited, base = item
            first = edited_shown_first(i)
            reply_a, reply_b = (edited, base) if first else (base, edited)
            messages = pairwise_messages(utterance, reply_a, reply_b, dim, target, opposite)
            return preference_of_edited(self._parsed("pairwise", parse_preference(self.complete(messages))), first)

        return self._map(prefer, list(zip(utterances, edited_replies, base_replies)), on_progress)

    # ----------------------------------------------------------------------------------------- measures

    def pae(self, base_texts: Sequence[str], edited_texts: Sequence[str], trait: Dimension | str,
            pole: str | float = "high", *, on_progress: Progress | None = None) -> float:
        """PAE: mean edited minus base rating over the pairs the judge rated both of."""
        _same_length(base_texts, edited_texts)
        ratings = self.rate_pae([*base_texts, *edited_texts], trait, pole, on_progress=on_progress)
        pairs = [(b, e) for b, e in zip(ratings[:len(base_texts)], ratings[len(base_texts):])
                 if b is not None and e is not None]
        _require(pairs, "PAE")
        return _pae([b for b, _ in pairs], [e for _, e in pairs])

    def expression_rate(self, utterances: Sequence[str], replies: Sequence[str], dimension: Dimension | str,
                        pole: str | float, *, threshold: float = 0.5, on_progress: Progress | None = None) -> float:
        """PALETTE expression rate: share of the replies whose target-pole share exceeds `threshold`
        (unparseable judgements left out)."""
        shares = [s for s in self.pole_shares(utterances, replies, dimension, pole, on_progress=on_progress)
                  if s is not None]
        _require(shares, "the expression rate")
        return _expression_rate(shares, threshold)

    def win_rate(self, utterances: Sequence[str], edited_replies: Sequence[str], base_replies: Sequence[str],
                 dimension: Dimension | str, pole: str | float, *, on_progress: Progress | None = None) -> float:
        """PALETTE pairwise win rate of the edited replies: (wins + ties / 2) / n."""
        return _win_rate(self.pairwise(utterances, edited_replies, base_replies, dimension, pole,
                                       on_progress=on_progress))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")


def _require(values: Sequence, measure: str) -> None:
    if not values:
        raise PersonaEditError(f"the LLM judge gave no parseable answer for {measure}")
