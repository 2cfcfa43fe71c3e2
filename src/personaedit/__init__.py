"""personaedit: edit, steer and measure the personality of open-weight language models, offline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("personaedit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from personaedit.edits import ActivationEdit, ComposedEdit, ContextEdit, Edit, WeightEdit, load_edit  # noqa: E402
from personaedit.models import LoadedModel, generate, load_model  # noqa: E402
from personaedit.persona import Persona  # noqa: E402

__all__ = [
    "ActivationEdit", "ComposedEdit", "ContextEdit", "Edit", "LoadedModel", "Persona", "WeightEdit",
    "__version__", "generate", "load_edit", "load_model",
]
