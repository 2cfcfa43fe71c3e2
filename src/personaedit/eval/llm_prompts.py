"""What the optional LLM judge asks and how its answers are read: the three prompts (METHODS.md
"Measures": PAE rating, PALETTE expression share, PALETTE pairwise preference), the poles they name,
and the parsers of the judge's free-text answers (None when an answer cannot be read)."""

from __future__ import annotations

import re

from personaedit.persona import Dimension, Pole, dimension as _dimension, parse_level

Message = dict[str, str]


PAE_SYSTEM = ("You are a careful psychologist who rates how well a text expresses a personality. "
              "Reply with a single digit from 1 to 5 and nothing else.")
PAE_PROMPT = """Personality: {pole}.
Adjectives that describe it: {adjectives}.

Text:
<text>
{text}
</text>

On a scale from 1 (does not fit these adjectives at all) to 5 (fits them perfectly), how well does the \
personality shown in the text fit the adjectives? Reply with one digit from 1 to 5."""
SHARE_SYSTEM = ("You judge which personality a reply in a conversation expresses. "
                "Reply with a single percentage and nothing else.")
SHARE_PROMPT = """Two opposite personality poles:
- {target}: {target_adjectives}
- {opposite}: {opposite_adjectives}

Someone said:
<utterance>
{utterance}
</utterance>

The reply was:
<reply>
{reply}
</reply>

Split 100% between the two poles according to how strongly the reply expresses each. What percentage \
goes to {target}? Reply with one number from 0 to 100 followed by %."""
PAIRWISE_SYSTEM = ("You compare two replies for the personality they express. "
                   "Answer with A, B or TIE and nothing else.")
PAIRWISE_PROMPT = """Target personality: {target}: {target_adjectives}.
(The opposite is {opposite}: {opposite_adjectives}.)

Someone said:
<utterance>
{utterance}
</utterance>

Reply A:
<reply>
{reply_a}
</reply>

Reply B:
<reply>
{reply_b}
</reply>

Which reply shows {target} more strongly? Answer A, B or TIE."""
MBTI_POLE_NAMES = {"E": "Extraversion", "I": "Introversion", "S": "Sensing", "N": "Intuition",
                   "T": "Thinking", "F": "Feeling", "J": "Judging", "P": "Perceiving"}


def resolve_pole(dim: Dimension | str, pole: str | float = "high") -> tuple[Dimension, Pole, Pole]:
    """(dimension, target pole, opposite pole) from a trait or axis name and 'high'/'low', a letter or a level."""
    dim = dim if isinstance(dim, Dimension) else _dimension(dim)
    level = parse_level(dim, pole)
    target = dim.pole(level)
    return dim, target, dim.pole(-1.0 if target is dim.high else 1.0)


def pole_label(dim: Dimension, pole: Pole) -> str:
    """'high extraversion' for a Big Five pole, 'Extraversion (E)' for an MBTI one."""
    if dim.kind == "mbti":
        return f"{MBTI_POLE_NAMES.get(pole.name, pole.name)} ({pole.name})"
    return f"{pole.name} {dim.name}"


def pae_messages(text: str, dim: Dimension, target: Pole) -> list[Message]:
    """The chat messages asking for a 1–5 fit of `text` to the adjectives of `target`."""
    prompt = PAE_PROMPT.format(pole=pole_label(dim, target), adjectives=", ".join(target.adjectives), text=text)
    return [{"role": "system", "content": PAE_SYSTEM}, {"role": "user", "content": prompt}]


def _pole_fields(dim: Dimension, target: Pole, opposite: Pole) -> dict[str, str]:
    return {"target": pole_label(dim, target), "target_adjectives": ", ".join(target.adjectives),
            "opposite": pole_label(dim, opposite), "opposite_adjectives": ", ".join(opposite.adjectives)}


def share_messages(utterance: str, reply: str, dim: Dimension, target: Pole, opposite: Pole) -> list[Message]:
    """The chat messages asking for the share (0–100%) of `target` vs `opposite` in `reply`."""
    prompt = SHARE_PROMPT.format(utterance=utterance, reply=reply, **_pole_fields(dim, target, opposite))
    return [{"role": "system", "content": SHARE_SYSTEM}, {"role": "user", "content": prompt}]


def pairwise_messages(utterance: str, reply_a: str, reply_b: str, dim: Dimension, target: Pole,
                      opposite: Pole) -> list[Message]:
    """The chat messages asking which of replies A and B shows `target` more."""
    prompt = PAIRWISE_PROMPT.format(utterance=utterance, reply_a=reply_a, reply_b=reply_b,
                                    **_pole_fields(dim, target, opposite))
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": prompt}]


_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*%")
_NAMED_LETTER = re.compile(r"\b(?i:reply|response|option|answer)\s*:?\s*\(?([AB])\b")
_LEADING_LETTER = re.compile(r"^[\s*_\"'`(\[]*([AB])(?:$|[\s*_\"'`)\]]*(?:$|[.,:;!\n]))")
_TIE = re.compile(r"\b(?:tie|equal|equally|neither|same)\b", re.IGNORECASE)
_DECORATION = " \t\r\n.,:;!*_\"'`()[]"


def parse_rating(reply: str) -> int | None:
    """The first whole number from 1 to 5 in the reply ('Rating: 4/5' -> 4); None when there is none."""
    for match in _NUMBER.finditer(reply or ""):
        token = match.group()
        if "." not in token and 1 <= int(token) <= 5:
            return int(token)
    return None


def parse_share(reply: str) -> float | None:
    """The first percentage in the reply (else its first number, read as a percentage) as a fraction in
    [0, 1]; None when there is none or it exceeds 100."""
    match = _PERCENT.search(reply or "") or _NUMBER.search(reply or "")
    if match is None:
        return None
    value = float(match.group(1) if match.re is _PERCENT else match.group())
    return value / 100.0 if 0.0 <= value <= 100.0 else None


def parse_preference(reply: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's answer ('B', 'Reply A', 'A.', 'tie'); None when it names neither
    reply nor a tie."""
    text = reply or ""
    bare = text.strip(_DECORATION).upper()
    if bare in ("A", "B", "TIE"):
        return bare
    letter = _NAMED_LETTER.search(text) or _LEADING_LETTER.match(text)
    if letter:
        return letter.group(1)
    return "TIE" if _TIE.search(text) else None


def edited_shown_first(index: int) -> bool:
    """Whether item `index` shows the edited reply as A (even items) or as B (odd items)."""
    return index % 2 == 0


def preference_of_edited(answer: str | None, edited_first: bool) -> int:
    """+1 when the edited reply wins, -1 when the base reply wins, 0 for a tie or no answer."""
    if answer not in ("A", "B"):
        return 0
    return 1 if (answer == "A") == edited_first else -1
