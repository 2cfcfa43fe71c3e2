"""Loaders for external data sets a user may have on disk.

- PersonalityEdit (the data of "Editing Personality for LLMs", as shipped with EasyEdit): a JSON list or
  JSON Lines of records with a topic (`ent`), opinion texts per trait and an optional target personality.
- Big5-Chat: a CSV of (trait, level, train_input, train_output) dialogue examples.
- EmpatheticDialogues-style CSV: conversations whose first utterances serve as dialogue openers.

All loaders read UTF-8 (a byte-order mark is tolerated), use only the standard library, and report
problems with the file as a one-line `InputFileError` that names the file.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from personaedit.data.readers import canonical_name, check_limit, csv_table, json_type, listing, normal_name, read_text, \
    require_columns, rows_as_dicts
from personaedit.errors import InputFileError, PersonaSpecError
from personaedit.persona import BIG_FIVE, suggestion

PERSONALITYEDIT_TRAITS = ("extraversion", "agreeableness", "neuroticism")  # the order target indices use
# PersonalityEdit's question about a topic, and the paraphrases its generality is measured with.
EDIT_QUESTION = "What do you think of {}?"
PARAPHRASES = ("What is your stance on {}?", "What is your opinion of {}?", "How do you feel about {}?")
POLES = ("high", "low")
_TRAIT_ALIASES = {"extroversion": "extraversion", "extrovert": "extraversion", "extravert": "extraversion"}
_POLE_ALIASES = {"h": "high", "l": "low", "hi": "high", "lo": "low"}
_TOPIC_KEYS = ("ent", "topic")
_TARGET_KEYS = ("target_per", "target_personality")
_BIG5_CHAT_COLUMNS = ("trait", "level", "train_input", "train_output")
_UTTERANCE_COLUMNS = ("utterance", "speaker_uttr")



@dataclass
class PersonalityEditRecord:
    """One PersonalityEdit topic: opinion texts per trait, the target trait if given, other fields."""

    topic: str
    texts: dict[str, list[str]]
    target: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DialogueExample:
    """A Big5-Chat example: a prompt and a response written with `pole` of `trait`."""

    trait: str
    pole: str
    prompt: str
    response: str


# ----------------------------------------------------------------------------------------------------
# PersonalityEdit


def load_personality_edit(path: str | Path) -> list[PersonalityEditRecord]:
    """Records of a PersonalityEdit file (a JSON list, or JSON Lines with one record per line)."""
    p, text = read_text(path)
    return [_personality_record(p, n, raw) for n, raw in enumerate(_json_records(p, text), start=1)]


def to_opinion_rows(records: Iterable[PersonalityEditRecord], pole: str = "high") -> list[dict[str, Any]]:
    """Opinion rows (topic, trait, pole, facet, text, split), one per text, in the project's shape.

    PersonalityEdit texts express the high pole of their trait, hence the default.
    """
    canonical = canonical_name(pole, POLES, _POLE_ALIASES)
    if canonical is None:
        raise PersonaSpecError(f"unknown pole {pole!r}{suggestion(str(pole), POLES)}")
    return [
        {"topic": r.topic, "trait": trait, "pole": canonical, "facet": None, "text": text, "split": None}
        for r in records
        for trait, texts in r.texts.items()
        for text in texts
    ]


def _json_records(p: Path, text: str) -> list[Any]:
    """The records of a JSON document (a list, one record, or {"data": [...]}) or of JSON Lines."""
    whole_error = None
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        try:
            return _record_list(p, json.loads(text))
        except json.JSONDecodeError as error:
            whole_error = error
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as error:
            if whole_error is not None and not items:  # not JSON Lines either: report the JSON error
                error, n = whole_error, whole_error.lineno
            raise InputFileError(
                f"{p}: not JSON or JSON Lines ({error.msg} at line {n} column {error.colno})"
            ) from None
    return items


def _record_list(p: Path, document: Any) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if any(normal_name(k) in _TOPIC_KEYS for k in document):
            return [document]
        lists = [v for v in document.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise InputFileError(
            f"{p}: expected a JSON list of records, found an object with keys {listing(document)}"
        )
    raise InputFileError(f"{p}: expected a JSON list of records, found a JSON {json_type(document)}")


def _personality_record(p: Path, n: int, raw: Any) -> PersonalityEditRecord:
    if not isinstance(raw, dict):
        raise InputFileError(f"{p}: record {n} is a JSON {json_type(raw)}, expected an object")
    topic, target, texts, extra = None, None, {}, {}
    for key, value in raw.items():
        name = normal_name(key)
        trait = canonical_name(name, BIG_FIVE, _TRAIT_ALIASES)
        if name in _TOPIC_KEYS and topic is None:
            topic = "" if value is None else str(value).strip()
        elif trait is not None:
            texts.setdefault(trait, []).extend(_string_list(p, n, key, value))
        elif name in _TARGET_KEYS and target is None:
            target = _target_trait(p, n, value)
        else:
            extra[key] = value
    if not topic:
        raise InputFileError(f"{p}: record {n} has no topic ('ent') (found keys: {listing(raw)})")
    if not texts:
        raise InputFileError(
            f"{p}: record {n} has no trait text lists (expected {', '.join(PERSONALITYEDIT_TRAITS)};"
            f" found keys: {listing(raw)}){_key_suggestion(raw)}"
        )
    ordered = {t: texts[t] for t in BIG_FIVE if t in texts}
    return PersonalityEditRecord(topic=topic, texts=ordered, target=target, extra=extra)


def _string_list(p: Path, n: int, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputFileError(f"{p}: record {n}: {key!r} must be a list of strings, not {json_type(value)}")
    return [v.strip() for v in value if v.strip()]


def _target_trait(p: Path, n: int, value: Any) -> str | None:
    """A target personality given as a trait name (any case) or an index 0-2 into PERSONALITYEDIT_TRAITS."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InputFileError(f"{p}: record {n}: target_per must be a trait name or 0-2, not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if 0 <= value < len(PERSONALITYEDIT_TRAITS):
            return PERSONALITYEDIT_TRAITS[value]
        raise InputFileError(
            f"{p}: record {n}: target_per index {value} is out of range "
            f"(0-2 = {', '.join(PERSONALITYEDIT_TRAITS)})"
        )
    trait = canonical_name(str(value), BIG_FIVE, _TRAIT_ALIASES)
    if trait is None:
        raise InputFileError(
            f"{p}: record {n}: unknown target_per {value!r}{suggestion(normal_name(str(value)), BIG_FIVE)}"
        )
    return trait


def _key_suggestion(raw: dict) -> str:
    for key in raw:
        close = difflib.get_close_matches(normal_name(key), list(BIG_FIVE), n=1, cutoff=0.75)
        if close:
            return f" (is {key!r} meant to be {close[0]!r}?)"
    return ""


# ----------------------------------------------------------------------------------------------------
# Big5-Chat


def load_big5_chat(
    path: str | Path, trait: str | None = None, pole: str | None = None, limit: int | None = None
) -> list[DialogueExample]:
    """Big5-Chat dialogue examples, optionally of one trait and/or pole, at most `limit` of them."""
    want_trait = None if trait is None else _argument(trait, BIG_FIVE, _TRAIT_ALIASES, "trait")
    want_pole = None if pole is None else _argument(pole, POLES, _POLE_ALIASES, "pole")
    check_limit(limit)
    p, text = read_text(path)
    columns, rows = csv_table(p, text)
    require_columns(p, columns, _BIG5_CHAT_COLUMNS)
    examples: list[DialogueExample] = []
    for line, row in rows_as_dicts(columns, rows):
        if limit is not None and len(examples) >= limit:
            break
        if not any(row[c].strip() for c in _BIG5_CHAT_COLUMNS):
            continue
        example = DialogueExample(
            trait=_cell(p, line, row["trait"], BIG_FIVE, _TRAIT_ALIASES, "trait"),
            pole=_cell(p, line, row["level"], POLES, _POLE_ALIASES, "level"),
            prompt=row["train_input"].strip(),
            response=row["train_output"].strip(),
        )
        if want_trait in (None, example.trait) and want_pole in (None, example.pole):
            examples.append(example)
    return examples


def _cell(p: Path, line: int, value: str, options, aliases, column: str) -> str:
    canonical = canonical_name(value, options, aliases)
    if canonical is None:
        hint = suggestion(normal_name(value), options)
        raise InputFileError(f"{p}: line {line}: unknown {column} {value!r}{hint}")
    return canonical


def _argument(value: str, options, aliases, what: str) -> str:
    canonical = canonical_name(value, options, aliases)
    if canonical is None:
        raise PersonaSpecError(f"unknown {what} {value!r}{suggestion(normal_name(str(value)), options)}")
    return canonical


# ----------------------------------------------------------------------------------------------------
# EmpatheticDialogues-style openers


def load_dialogue_openers(path: str | Path, limit: int | None = None) -> list[str]:
    """Dialogue openers: the first utterance of each conversation, deduplicated, in file order.

    With `conv_id` and `utterance_idx` columns the opener of a conversation is its non-empty utterance
    with the lowest index; without them every non-empty utterance is an opener. The utterance column is
    `utterance` or `speaker_uttr`; `_comma_` (the EmpatheticDialogues escape) becomes a comma.
    """
    check_limit(limit)
    p, text = read_text(path)
    columns, rows = csv_table(p, text, escaped_commas="_comma_" in text)
    text_column = next((c for c in _UTTERANCE_COLUMNS if c in columns), None)
    if text_column is None:
        raise InputFileError(
            f"{p}: missing column 'utterance' (or 'speaker_uttr') (found columns: {', '.join(columns)})"
        )
    utterances = [
        (line, row, _unescape(row[text_column])) for line, row in rows_as_dicts(columns, rows)
    ]
    utterances = [(line, row, u) for line, row, u in utterances if u]
    if "conv_id" in columns and "utterance_idx" in columns:
        texts = _first_per_conversation(p, utterances)
    else:
        texts = [u for _, _, u in utterances]
    openers = list(dict.fromkeys(texts))
    return openers if limit is None else openers[:limit]


def _first_per_conversation(p: Path, utterances: list[tuple[int, dict, str]]) -> list[str]:
    first: dict[str, tuple[float, str]] = {}  # conv_id -> (utterance_idx, text), in order of appearance
    for line, row, text in utterances:
        index = _utterance_index(p, line, row["utterance_idx"])
        conv = row["conv_id"].strip()
        if conv not in first or index < first[conv][0]:
            first[conv] = (index, text)
    return [text for _, text in first.values()]


def _utterance_index(p: Path, line: int, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise InputFileError(f"{p}: line {line}: utterance_idx {value!r} is not a number") from None


def _unescape(text: str) -> str:
    return text.replace("_comma_", ",").strip()
