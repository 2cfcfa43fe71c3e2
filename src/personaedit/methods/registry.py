"""Every method, listed once, by name: each is a function (lm, persona, **options) -> Edit.

The list is static (no registration by import side effect): to add a method, write its module with a
`fit` and add one `Method(...)` row to `METHODS`, then run `python -m personaedit.method_options` (the
command line's copy of every method's options, so that `edit METHOD --help` needs no torch). A fit's options are its keyword-only parameters, with
option groups (option_groups.py) flattened into their fields; `fit_edit` records every option's value in the edit.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

from personaedit.edits import Edit
from personaedit.errors import PersonaEditError
from personaedit.methods import dpnle, ike, memit, mend, npti, palette, prompt, rome, serac, steer
from personaedit.models import LoadedModel
from personaedit.option_groups import group_options, is_group
from personaedit.persona import Persona
from personaedit.progress import Progress


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # context | activation | weight
    fit: Callable[..., Edit]
    pretty_name: str
    reference: str  # the paper (and reference code) the method follows
    persona_alone: bool = True  # False: fitting also needs a query or topic (rome, mend, serac)
    calibrated: bool = False  # `personaedit calibrate` chooses its setting per model (calibration.search_space)

    @property
    def summary(self) -> str:
        """The first line of the fit docstring."""
        return (inspect.getdoc(self.fit) or "").split("\n")[0]

    def option_help(self) -> dict[str, str]:
        """Help per option: from the fit docstring's `Options:` section (`name: text`, continued indented), and
        an option group's from its fields."""
        helps = {name: opt.help for group in self._groups().values() for name, opt in group_options(group).items()}
        lines = (inspect.getdoc(self.fit) or "").splitlines()
        if "Options:" not in lines:
            return helps
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
        """The method's options, name -> keyword-only parameter with its default and (resolved) annotation:
        the fit function's own, and each option group's fields in the group's place."""
        hints = typing.get_type_hints(self.fit)
        flat: dict[str, inspect.Parameter] = {}
        for name, param in self._parameters().items():
            if is_group(param.default):
                for field, opt in group_options(param.default).items():
                    flat[field] = inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=opt.default,
                                                    annotation=opt.annotation)
            else:
                flat[name] = param.replace(annotation=hints.get(name, param.annotation))
        return flat

    def _parameters(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.fit).parameters
        return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and not n.startswith("on_")}

    def _groups(self) -> dict[str, Any]:
        """Parameter name -> the default instance of each option group the fit takes."""
        return {n: p.default for n, p in self._parameters().items() if is_group(p.default)}

    def arguments(self, options: dict[str, Any]) -> dict[str, Any]:
        """Flat options -> the fit's keyword arguments (each group's fields folded into the group)."""
        unknown = set(options) - set(self.options())
        if unknown:
            raise PersonaEditError(f"method {self.name} has no option {sorted(unknown)[0]!r} "
                                   f"(valid: {', '.join(self.options())})")
        kwargs = {n: v for n, v in options.items() if n in self._parameters()}
        for name, group in self._groups().items():
            kwargs[name] = dataclasses.replace(group, **{f: options[f] for f in group_options(group) if f in options})
        return kwargs


METHODS: tuple[Method, ...] = (
    Method("prompt", "context", prompt.fit, "PROMPT (P²-style persona prompt)",
           "Jiang et al. 2022, Evaluating and Inducing Personality in Pre-trained Language Models"),
    Method("ike", "context", ike.fit, "IKE (in-context editing)",
           "Zheng et al. 2023, Can We Edit Factual Knowledge by In-Context Learning?; "
           "a PersonalityEdit baseline (Mao et al., Editing Personality for LLMs)"),
    Method("steer", "activation", steer.fit, "Mean-difference steering (CAA / ActAdd)",
           "Rimsky et al. 2023, Steering Llama 2 via Contrastive Activation Addition; "
           "Turner et al. 2023, Activation Addition", calibrated=True),
    Method("npti", "activation", npti.fit, "NPTI (neuron-based personality trait induction)",
           "Deng et al. 2024, Neuron-based Personality Trait Induction in Large Language Models; code RUCAIBox/NPTI",
           calibrated=True),
    Method("dpnle", "activation", dpnle.fit, "DPN-LE (dual personality neuron localization and editing)",
           "DPN-LE: Dual Personality Neuron Localization and Editing for Large Language Models; code Z1ivan/DPN-LE",
           calibrated=True),
    Method("rome", "weight", rome.fit, "ROME (r-ROME core)",
           "Meng et al. 2022, Locating and Editing Factual Associations in GPT; "
           "Gupta et al. 2024, Rebuilding ROME", persona_alone=False),
    Method("palette", "weight", palette.fit, "PALETTE (adjustment queries)",
           "Personality Editing for Language Models through Adjusting Self-Referential Queries, arXiv:2502.11789",
           calibrated=True),
    Method("memit", "weight", memit.fit, "MEMIT (multi-layer batch edit)",
           "Meng et al. 2023, Mass-Editing Memory in a Transformer"),
    Method("mend", "weight", mend.fit, "MEND (gradient-decomposition editor)",
           "Mitchell et al. 2022, Fast Model Editing at Scale; a PersonalityEdit baseline", persona_alone=False),
    Method("serac", "context", serac.fit, "SERAC (edit memory with a scope classifier)",
           "Mitchell et al. 2022, Memory-Based Model Editing at Scale; a PersonalityEdit baseline", persona_alone=False),
)
_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}


def all_methods() -> dict[str, Method]:
    return dict(_BY_NAME)


def get_method(name: str) -> Method:
    if name not in _BY_NAME:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(_BY_NAME)})"
        raise PersonaEditError(f"unknown method {name!r}{hint}")
    return _BY_NAME[name]


def fit_edit(name: str, lm: LoadedModel, persona: Persona | str, *,
             on_progress: Progress | None = None, **options: Any) -> Edit:
    """Fit method `name` for `persona` on `lm` with flat `options`. The edit records every option's value,
    defaults included, under what the fit itself recorded (the values it resolved, how it went)."""
    chosen = get_method(name)
    kwargs = chosen.arguments(options)
    if on_progress is not None and "on_progress" in inspect.signature(chosen.fit).parameters:
        kwargs["on_progress"] = on_progress
    edit = chosen.fit(lm, Persona.parse(persona), **kwargs)
    given = {n: options.get(n, p.default) for n, p in chosen.options().items()
             if n in options or p.default is not inspect.Parameter.empty}
    return dataclasses.replace(edit, options={**given, **edit.options})
