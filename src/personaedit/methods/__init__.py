"""Methods, one module each, registered by name: fit(lm, persona, **options) -> Edit."""

from personaedit.methods.registry import Method, all_methods, fit_edit, get_method, method

__all__ = ["Method", "all_methods", "fit_edit", "get_method", "method"]
