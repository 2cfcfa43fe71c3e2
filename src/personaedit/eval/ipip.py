"""The IPIP-NEO-120 items (public domain, shipped in the PyPI package `ffm`) as the inventory asks them: each
item's text, trait, NEO facet and keying, read from ffm's own tables, and addressed to the model ('You ...')."""

from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any

from personaedit.errors import InputFileError
from personaedit.persona import BIG_FIVE

FFM_INSTALL = "pip install ffm==0.1.0"


@dataclass(frozen=True)
class Item:
    """One IPIP-NEO-120 item: its number (1-120), the first-person text as `ffm` ships it, and its key."""

    number: int
    text: str
    trait: str
    facet: str
    reverse_keyed: bool

    @property
    def statement(self) -> str:
        """The item addressed to the model: 'I worry about things.' -> 'You worry about things.'"""
        return second_person(self.text)


_SECOND_PERSON = ((r"\bI'm\b", "you're"), (r"\bI am\b", "you are"), (r"\bI\b", "you"),
                  (r"\bmyself\b", "yourself"), (r"\bmy\b", "your"), (r"\bme\b", "you"))


def second_person(text: str) -> str:
    """A first-person item (or an IPIP verb phrase such as 'Worry about things') as a 'You ...' sentence."""
    text = text.strip()
    if not re.match(r"I\b", text):
        text = "I " + text[0].lower() + text[1:]
    for pattern, replacement in _SECOND_PERSON:
        text = re.sub(pattern, replacement, text)
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def ipip_neo_120() -> list[Item]:
    """The 120 IPIP-NEO items with trait, NEO facet and keying, read from the installed `ffm` package."""
    return list(_ipip_items())


@functools.lru_cache(maxsize=1)
def _ipip_items() -> tuple[Item, ...]:
    statements, trait_items, reverse_items = _ffm_tables()
    items: dict[int, Item] = {}
    for ffm_trait, numbers in trait_items.items():
        trait = ffm_trait.lower()
        # IPIP-NEO-120 order: within a trait the items cycle through its six NEO facets.
        for position, index in enumerate(sorted(numbers)):
            facet = BIG_FIVE[trait].facets[position % 6]
            items[index] = Item(index + 1, statements[index], trait, facet, index in reverse_items[ffm_trait])
    return tuple(items[i] for i in sorted(items))


def _ffm_tables() -> tuple[list[str], dict[str, list[int]], dict[str, set[int]]]:
    """(statements, trait -> 0-based item indices, trait -> reverse-keyed indices) from ffm's source.

    ffm keeps the keys as literals inside its `score` function; they are read with `ast.literal_eval`
    (nothing of ffm's scoring runs, so pandas is not needed)."""
    try:
        from FFM import core
    except ImportError as exc:
        raise InputFileError(f"the IPIP-NEO-120 items come from the package 'ffm', which is not installed: "
                             f"{FFM_INSTALL}") from exc
    literals: dict[str, Any] = {}
    try:
        tree = ast.parse(inspect.getsource(core))
        score_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "score")
        for node in ast.walk(score_fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id in ("trait_items", "reverse_items"):
                    literals[node.targets[0].id] = ast.literal_eval(node.value)
        statements = [str(s) for s in core.Qs]
        trait_items = {str(t): [int(i) for i in v] for t, v in literals["trait_items"].items()}
        reverse_items = {str(t): {int(i) for i in v} for t, v in literals["reverse_items"].items()}
    except (StopIteration, KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError) as exc:
        raise InputFileError(f"the installed ffm does not hold the IPIP-NEO-120 tables where expected "
                             f"({type(exc).__name__}); {FFM_INSTALL}") from exc
    _check_tables(statements, trait_items, reverse_items)
    return statements, trait_items, reverse_items


def _check_tables(statements: list[str], trait_items: dict[str, list[int]],
                  reverse_items: dict[str, set[int]]) -> None:
    traits = {t.lower() for t in trait_items}
    indices = sorted(i for v in trait_items.values() for i in v)
    problems = []
    if len(statements) != 120:
        problems.append(f"{len(statements)} statements")
    if traits != set(BIG_FIVE):
        problems.append(f"traits {sorted(traits)}")
    if indices != list(range(120)) or any(len(v) != 24 for v in trait_items.values()):
        problems.append("items not 24 per trait")
    if any(not reverse_items.get(t, set()) <= set(v) for t, v in trait_items.items()):
        problems.append("reverse keys outside their trait")
    if problems:
        raise InputFileError(f"the installed ffm does not ship the IPIP-NEO-120 as expected "
                             f"({'; '.join(problems)}); {FFM_INSTALL}")
