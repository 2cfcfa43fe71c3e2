"""Which edit a request runs under: a named edit loaded at start, none, or a persona fitted on first use.

Persona fits are cached by (method, persona) and run one at a time, holding the model lock so no batch
generates while a fit's hooks and weight changes are in place.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from personaedit.edits import Edit
from personaedit.errors import PersonaEditError
from personaedit.models.loading import LoadedModel
from personaedit.persona import Persona
from personaedit.serve.rowwise import PreparedEdit

BASE_NAME = "default"
DEFAULT_METHOD = "steer"


class RequestError(Exception):
    """A request the server refuses: OpenAI-style error fields and an HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


def _fit_edit(name: str, lm: LoadedModel, persona: Persona, **options: Any) -> Edit:
    from personaedit.methods import fit_edit

    return fit_edit(name, lm, persona, **options)


def _one_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class EditCatalog:
    def __init__(self, lm: LoadedModel, edits: Mapping[str, tuple[Edit, float]], *, model_lock: threading.Lock,
                 fit_options: Mapping[str, Mapping[str, Any]] | None = None,
                 fit: Callable[..., Edit] = _fit_edit):
        self.lm = lm
        self.base_names = {BASE_NAME, lm.spec}
        clash = self.base_names & set(edits)
        if clash:
            raise PersonaEditError(f"edit name {sorted(clash)[0]!r} is taken by the base model; choose another")
        self.named = {name: (PreparedEdit.of(lm, edit), float(strength)) for name, (edit, strength) in edits.items()}
        self.fit_options = {k: dict(v) for k, v in (fit_options or {}).items()}
        self._fit = fit
        self._fitted: dict[tuple[str, str], PreparedEdit] = {}
        self._fit_lock = threading.Lock()  # one fit at a time; a second request for the same edit waits for it
        self._model_lock = model_lock

    def model_ids(self) -> list[str]:
        return [BASE_NAME, *self.named]

    def resolve(self, model: str, persona: str | None = None, strength: float | None = None,
                method: str | None = None) -> tuple[PreparedEdit, float] | None:
        """The (edit, strength) a request asks for, or None for the plain model. May fit (slow)."""
        if persona is not None:
            if model not in self.base_names:
                raise RequestError(f"give either a persona or a named edit, not both (model {model!r})", param="persona")
            return self._persona_edit(persona, method or DEFAULT_METHOD), 1.0 if strength is None else strength
        if method is not None:
            raise RequestError("'method' needs a 'persona' to fit", param="method")
        if model in self.base_names:
            return None
        if model not in self.named:
            raise RequestError(f"the model {model!r} does not exist (served: {', '.join(self.model_ids())})",
                               param="model", code="model_not_found", status=404)
        prepared, default_strength = self.named[model]
        return prepared, default_strength if strength is None else strength

    def _persona_edit(self, spec: str, method: str) -> PreparedEdit:
        from personaedit.methods import get_method

        try:
            persona = Persona.parse(spec)
        except PersonaEditError as exc:
            raise RequestError(_one_line(exc), param="persona") from None
        try:
            chosen = get_method(method)
        except PersonaEditError as exc:
            raise RequestError(_one_line(exc), param="method") from None
        if not chosen.persona_alone:
            raise RequestError(f"method {method!r} needs more than a persona to fit; serve a saved edit of it "
                               "with --edit NAME=DIR", param="method")
        key = (method, persona.spec())
        with self._fit_lock:
            if key not in self._fitted:
                with self._model_lock:
                    edit = self._fit(method, self.lm, persona, **self.fit_options.get(method, {}))
                self._fitted[key] = PreparedEdit.of(self.lm, edit)
        return self._fitted[key]
