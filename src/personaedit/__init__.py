"""personaedit: edit, steer and measure the personality of open-weight language models, offline.

The public names load on first use (PEP 562), so `import personaedit.cli` and `personaedit --help` do not
pay for importing torch and transformers.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("personaedit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

_PUBLIC = {
    "ActivationEdit": "personaedit.edits", "ComposedEdit": "personaedit.edits", "ContextEdit": "personaedit.edits",
    "Edit": "personaedit.edits", "WeightEdit": "personaedit.edits", "load_edit": "personaedit.edits",
    "LoadedModel": "personaedit.models", "generate": "personaedit.models", "load_model": "personaedit.models",
    "Persona": "personaedit.persona",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personaedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
