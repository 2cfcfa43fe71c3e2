"""Methods registered by name: each is a function (lm, persona, **options) -> Edit."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from personaedit.edits import Edit
from personaedit.errors import PersonaEditError
from personaedit.models import LoadedModel
from personaedit.persona import Persona

# Modules that register methods when imported; listed here so that lookup by name finds them all.
METHOD_MODULES = ("prompt", "ike", "steer", "npti", "dpnle", "rome", "palette", "memit", "mend", "serac")


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    fit: Callable[..., Edit]
    summary: str
    persona_alone: bool = True  # False: fitting also needs a query or topic (rome, mend, serac)

    def option_help(self) -> dict[str, str]:
        """Help per option, from the fit docstring's `Options:` section (`name: text`, continued indented)."""
        lines = (inspect.getdoc(self.fit) or "").splitlines()
        if "Options:" not in lines:
            return {}
        helps: dict[str, str] = {}
        current = None
        for line in lines[lines.index("Options:") + 1:]:
            if not line.strip():
                break
            name, sep, text = line.strip().partition(": ")
            if sep and not line.startswith("        ") and name.isidentifier():
                current = name
                helps[name] = text
            elif current:
                helps[current] += " " + line.strip()
        return helps

    def options(self) -> dict[str, inspect.Parameter]:
        """Keyword-only options of the fit function (name -> parameter with default and annotation)."""
        params = inspect.signature(self.fit).parameters
        return {n: p for n, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and not n.startswith("on_")}


_METHODS: dict[str, Method] = {}


def method(name: str, family: str, persona_alone: bool = True):
    """Register `fit(lm, persona, *, options...) -> Edit` under `name`; `persona_alone=False` when a fit
    also needs an option without a usable default (a query, a topic)."""

    def register(fit: Callable[..., Edit]) -> Callable[..., Edit]:
        summary = (inspect.getdoc(fit) or "").split("\n")[0]
        _METHODS[name] = Method(name, family, fit, summary, persona_alone)
        return fit

    return register


def all_methods() -> dict[str, Method]:
    for module in METHOD_MODULES:
        importlib.import_module(f"personaedit.methods.{module}")
    return dict(_METHODS)


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(methods)})"
        raise PersonaEditError(f"unknown method {name!r}{hint}")
    return methods[name]


def fit_edit(name: str, lm: LoadedModel, persona: Persona | str, **options: Any) -> Edit:
    """Fit method `name` for `persona` on `lm`."""
    chosen = get_method(name)
    unknown = set(options) - set(chosen.options())
    if unknown:
        raise PersonaEditError(f"method {name} has no option {sorted(unknown)[0]!r} (valid: {', '.join(chosen.options())})")
    return chosen.fit(lm, Persona.parse(persona), **options)

