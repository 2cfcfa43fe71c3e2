"""The benchmark grid: which methods, personas and strengths, expanded into cells with stable keys."""

from __future__ import annotations

import hashlib
import math
import inspect
from dataclasses import dataclass
from typing import Any, Iterable

from personaedit.errors import PersonaEditError
from personaedit.methods.registry import all_methods, get_method
from personaedit.persona import BIG_FIVE, Persona

# Shorthands for --personas.
PERSONA_SETS = {
    "all-poles": [f"{trait}={pole}" for trait in BIG_FIVE for pole in ("high", "low")],
    "all-high": [f"{trait}=high" for trait in BIG_FIVE],
}


@dataclass(frozen=True)
class Cell:
    """One measurement: `method` fitted for `persona` and applied at `strength`."""

    method: str
    persona: str  # canonical spec, e.g. "extraversion=1"
    strength: float

    @property
    def key(self) -> str:
        return f"{self.method}|{self.persona}|{self.strength:g}"

    @property
    def fit_key(self) -> str:
        """Cells that differ only in strength share one fitted edit."""
        return f"{self.method}-{hashlib.sha256(self.persona.encode()).hexdigest()[:12]}"


def needs_no_extra_input(name: str) -> bool:
    """Methods that fit from a persona alone (not rome, which needs a query, nor mend/serac, a topic)."""
    chosen = get_method(name)
    options = chosen.options()
    return chosen.persona_alone and all(p.default is not inspect.Parameter.empty for p in options.values())


def select_methods(spec: str | Iterable[str]) -> list[str]:
    """'all' (every method that fits from a persona alone) or a comma-separated list of method names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return [n for n in all_methods() if needs_no_extra_input(n)]
    if not names:
        raise PersonaEditError("no methods: give --methods all or a comma-separated list")
    for name in names:
        get_method(name)  # one-line error with a suggestion for an unknown name
    return list(dict.fromkeys(names))


def parse_personas(specs: Iterable[str]) -> list[str]:
    """Persona specs (or the shorthands all-poles / all-high) -> canonical specs, in order, no repeats."""
    out: list[str] = []
    for spec in specs:
        for one in PERSONA_SETS.get(spec.strip(), [spec]):
            out.append(Persona.parse(one).spec())
    if not out:
        raise PersonaEditError("no personas: give --personas SPEC (repeatable) or all-poles")
    return list(dict.fromkeys(out))


def parse_strengths(spec: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]."""
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PersonaEditError(f"bad strengths {spec!r}: give comma-separated numbers, e.g. 0,0.5,1") from None
    if not values:
        raise PersonaEditError("no strengths: give e.g. --strengths 1 or 0,0.5,1,2")
    if not all(math.isfinite(v) for v in values):
        raise PersonaEditError(f"bad strengths {spec!r}: every strength must be a finite number")
    return list(dict.fromkeys(values))


def parse_method_options(settings: Iterable[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """['dpnle.pairs=500', 'steer.layer=12'] -> {'dpnle': {'pairs': 500}, 'steer': {'layer': '12'}}, each
    value converted to the type of the option's default."""
    parsed: dict[str, dict[str, Any]] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        method, _, option = name.partition(".")
        if not value or not option:
            raise PersonaEditError(f"bad --set {setting!r}: use METHOD.OPTION=VALUE, e.g. dpnle.pairs=500")
        if method not in methods:
            raise PersonaEditError(f"setting {setting!r} is for method {method!r}, which is not in --methods")
        options = get_method(method).options()
        if option not in options:
            raise PersonaEditError(f"method {method} has no option {option!r} (valid: {', '.join(options)})")
        parsed.setdefault(method, {})[option] = _typed(value, options[option].default, setting)
    return parsed


def _typed(value: str, default: Any, setting: str) -> Any:
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, (int, float)):
            return type(default)(value)
    except ValueError:
        raise PersonaEditError(f"bad value in {setting!r}: expected {type(default).__name__}") from None
    return value


def expand_grid(methods: list[str], personas: list[str], strengths: list[float]) -> list[Cell]:
    return [Cell(m, p, s) for m in methods for p in personas for s in strengths]
