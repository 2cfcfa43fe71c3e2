"""Loading models, knowing their layout, and generating from them."""

from personaedit.models.arch import Architecture
from personaedit.models.generation import Context, generate
from personaedit.models.loading import LoadedModel, load_model, wrap_model

__all__ = ["Architecture", "Context", "LoadedModel", "generate", "load_model", "wrap_model"]
