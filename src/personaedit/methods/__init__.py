"""Methods, one module each, listed by name in `registry.METHODS`: fit(lm, persona, **options) -> Edit."""

from personaedit.methods.registry import METHODS, Method, all_methods, fit_edit, get_method

__all__ = ["METHODS", "Method", "all_methods", "fit_edit", "get_method"]
