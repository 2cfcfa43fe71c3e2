"""The personality model (Big Five with NEO facets, MBTI-style axes) and persona specs.

A persona maps dimension names to a signed level in [-1, 1]: +1 is fully the high pole of a Big Five
trait or the first letter of an MBTI axis (E, S, T, J), -1 fully the other pole.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from personaedit.errors import PersonaSpecError


@dataclass(frozen=True)
class Pole:
    name: str
    adjectives: tuple[str, ...]


@dataclass(frozen=True)
class Dimension:
    """A Big Five trait or an MBTI axis: a name, two poles, and (for traits) NEO facets."""

    name: str
    kind: str  # "big5" or "mbti"
    high: Pole
    low: Pole
    facets: tuple[str, ...] = ()

    def pole(self, level: float) -> Pole:
        return self.high if level >= 0 else self.low

    @property
    def pole_names(self) -> tuple[str, str]:
        return self.high.name, self.low.name


BIG_FIVE: dict[str, Dimension] = {
    d.name: d
    for d in [
        Dimension(
            "openness", "big5",
            Pole("high", ("imaginative", "curious", "artistic", "adventurous", "intellectual", "open-minded")),
            Pole("low", ("conventional", "practical", "down-to-earth", "routine-loving", "traditional", "incurious")),
            ("imagination", "artistic_interests", "emotionality", "adventurousness", "intellect", "liberalism"),
        ),
        Dimension(
            "conscientiousness", "big5",
            Pole("high", ("organized", "responsible", "disciplined", "thorough", "hardworking", "careful")),
            Pole("low", ("disorganized", "careless", "spontaneous", "easygoing about rules", "lax", "impulsive")),
            ("self_efficacy", "orderliness", "dutifulness", "achievement_striving", "self_discipline", "cautiousness"),
        ),
        Dimension(
            "extraversion", "big5",
            Pole("high", ("outgoing", "talkative", "energetic", "sociable", "assertive", "enthusiastic")),
            Pole("low", ("reserved", "quiet", "solitary", "shy", "withdrawn", "low-key")),
            ("friendliness", "gregariousness", "assertiveness", "activity_level", "excitement_seeking", "cheerfulness"),
        ),
        Dimension(
            "agreeableness", "big5",
            Pole("high", ("kind", "trusting", "warm", "cooperative", "generous", "sympathetic")),
            Pole("low", ("blunt", "skeptical", "competitive", "stubborn", "critical", "uncooperative")),
            ("trust", "morality", "altruism", "cooperation", "modesty", "sympathy"),
        ),
        Dimension(
            "neuroticism", "big5",
            Pole("high", ("anxious", "moody", "tense", "easily upset", "insecure", "worried")),
            Pole("low", ("calm", "relaxed", "even-tempered", "secure", "unflappable", "emotionally stable")),
            ("anxiety", "anger", "depression", "self_consciousness", "immoderation", "vulnerability"),
        ),
    ]
}

MBTI: dict[str, Dimension] = {
    d.name: d
    for d in [
        Dimension("ei", "mbti",
                  Pole("E", ("outgoing", "energised by people", "expressive", "talkative")),
                  Pole("I", ("reflective", "energised by solitude", "reserved", "inward-looking"))),
        Dimension("sn", "mbti",
                  Pole("S", ("practical", "concrete", "detail-oriented", "realistic")),
                  Pole("N", ("imaginative", "abstract", "future-oriented", "big-picture"))),
        Dimension("tf", "mbti",
                  Pole("T", ("logical", "objective", "analytical", "fact-driven")),
                  Pole("F", ("empathetic", "warm", "values-driven", "compassionate"))),
        Dimension("jp", "mbti",
                  Pole("J", ("planned", "organised", "decisive", "structured")),
                  Pole("P", ("flexible", "spontaneous", "adaptable", "open-ended"))),
    ]
}

DIMENSIONS: dict[str, Dimension] = {**BIG_FIVE, **MBTI}

_POLE_WORDS = {"E": "extraversion", "I": "introversion", "S": "sensing", "N": "intuition",
               "T": "thinking", "F": "feeling", "J": "judging", "P": "perceiving"}
MBTI_LEGEND = ("MBTI-style axes: " + "; ".join(
    f"{d.name} = {_POLE_WORDS[d.high.name]} ({d.high.name}, +) vs {_POLE_WORDS[d.low.name]} ({d.low.name}, −)"
    for d in MBTI.values()) + ".")


def describe_persona(persona: "Persona | Mapping[str, object] | str | None") -> str:
    """A persona as its spec (`extraversion=high,tf=T`), however it was stored; '-' for none."""
    if persona is None or persona == {}:
        return "-"
    if isinstance(persona, str):
        return persona
    if isinstance(persona, Mapping):
        return Persona.from_mapping(persona).spec()
    return persona.spec()

_NAMED_LEVELS = {"high": 1.0, "low": -1.0, "+": 1.0, "-": -1.0}


def dimension(name: str) -> Dimension:
    """The dimension called `name`; an unknown name is rejected with the closest valid one."""
    key = name.strip().lower()
    if key in DIMENSIONS:
        return DIMENSIONS[key]
    raise PersonaSpecError(f"unknown trait or axis {name!r}{suggestion(key, DIMENSIONS)}")


def suggestion(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, else ' (valid: ...)': the tail of a one-line error."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.4)
    valid = ", ".join(options)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {valid})"


def parse_level(dim: Dimension, value: object) -> float:
    """A level for `dim` from 'high'/'low', an MBTI letter, or a number in [-1, 1]."""
    if isinstance(value, bool):
        raise PersonaSpecError(f"level for {dim.name} must be high, low or a number in [-1, 1], not {value!r}")
    if isinstance(value, (int, float)):
        level = float(value)
    else:
        text = str(value).strip()
        letters = {dim.high.name.lower(): 1.0, dim.low.name.lower(): -1.0} if dim.kind == "mbti" else {}
        named = {**_NAMED_LEVELS, **letters}
        if text.lower() in named:
            level = named[text.lower()]
        else:
            try:
                level = float(text)
            except ValueError:
                options = list(named)
                raise PersonaSpecError(
                    f"bad level {text!r} for {dim.name}{suggestion(text.lower(), options)}"
                ) from None
    if not math.isfinite(level) or not -1.0 <= level <= 1.0:
        raise PersonaSpecError(f"level for {dim.name} must be in [-1, 1], got {level}")
    return level


@dataclass(frozen=True)
class Persona:
    """A target profile: dimension name -> signed level in [-1, 1], in the order given."""

    levels: tuple[tuple[str, float], ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> "Persona":
        if not mapping:
            raise PersonaSpecError("a persona needs at least one trait, e.g. extraversion=high")
        levels: dict[str, float] = {}
        for name, value in mapping.items():
            dim = dimension(str(name))
            if dim.name in levels:
                raise PersonaSpecError(f"{dim.name} is given twice")
            levels[dim.name] = parse_level(dim, value)
        return cls(tuple(levels.items()))

    @classmethod
    def parse(cls, spec: "str | os.PathLike | Mapping[str, object] | Persona") -> "Persona":
        """Parse `extraversion=high,agreeableness=-0.5`, a YAML mapping (text or file), or a dict."""
        if isinstance(spec, Persona):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_mapping(spec)
        text = str(spec).strip()
        if not text:
            raise PersonaSpecError("a persona needs at least one trait, e.g. extraversion=high")
        if text.endswith((".yaml", ".yml")) or (os.sep in text and Path(text).is_file()):
            path = Path(text)
            if not path.is_file():
                raise PersonaSpecError(f"persona file not found: {text}")
            text = path.read_text(encoding="utf-8")
        if "=" in text and ":" not in text.split("=", 1)[0]:
            pairs: dict[str, str] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                if "=" not in part:
                    raise PersonaSpecError(f"expected trait=level, got {part!r}")
                name, value = (s.strip() for s in part.split("=", 1))
                if name in pairs:
                    raise PersonaSpecError(f"{name} is given twice")
                pairs[name] = value
            return cls.from_mapping(pairs)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PersonaSpecError(f"persona is neither trait=level pairs nor YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, Mapping):
            raise PersonaSpecError(f"persona must map traits to levels, e.g. extraversion=high; got {text!r}")
        return cls.from_mapping(data)

    def as_dict(self) -> dict[str, float]:
        return dict(self.levels)

    def towards(self, scores: Mapping[str, float]) -> float:
        """Mean judge score over this persona's dimensions, signed so that + means towards its poles."""
        signed = [(1.0 if level > 0 else -1.0) * scores[dim] for dim, level in self.levels if level != 0]
        return sum(signed) / len(signed) if signed else 0.0

    def spec(self) -> str:
        """The spec string that parses back to this persona (poles by name at ±1)."""
        parts = []
        for dim, (name, level) in zip(self.dimensions(), self.levels):
            named = {1.0: dim.high.name, -1.0: dim.low.name}.get(level)
            parts.append(f"{name}={named or format(level, 'g')}")
        return ",".join(parts)

    def scaled(self, factor: float) -> "Persona":
        """Levels times `factor` (not clipped: a level beyond 1 asks for more than the pole)."""
        return Persona(tuple((name, level * factor) for name, level in self.levels))

    def dimensions(self) -> list[Dimension]:
        return [DIMENSIONS[name] for name, _ in self.levels]

    def __str__(self) -> str:
        return self.spec()


def intensity_word(level: float) -> str | None:
    """P²-style intensity for |level|: 'a bit', plain, 'very', 'extremely'; None when negligible."""
    size = abs(level)
    if size < 0.05:
        return None
    if size < 0.4:
        return "a bit"
    if size < 0.8:
        return ""
    if size <= 1.0 + 1e-9:
        return "very"
    return "extremely"


def describe(persona: Persona, adjectives_per_trait: int | None = None) -> str:
    """A second-person system prompt describing the persona with adjectives of each target pole."""
    phrases: list[str] = []
    for dim, (_, level) in zip(persona.dimensions(), persona.levels):
        word = intensity_word(level)
        if word is None:
            continue
        count = adjectives_per_trait or max(2, min(len(dim.pole(level).adjectives), round(2 + 3 * min(abs(level), 1.5))))
        adjectives = list(dim.pole(level).adjectives[:count])
        listed = ", ".join(adjectives[:-1]) + f" and {adjectives[-1]}" if len(adjectives) > 1 else adjectives[0]
        phrases.append(f"{word} {listed}".strip())
    if not phrases:
        return ""
    return (
        "You are a person who is " + "; ".join(phrases) + ". "
        "Answer every message in character, in the first person, and let this show in what you say and how you say it."
    )
