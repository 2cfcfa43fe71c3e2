"""The one-command benchmark: a grid of (method, persona, strength) cells, fitted, measured and stored."""

from personaedit.bench.grid import (Cell, expand_grid, parse_method_options, parse_personas, parse_strengths,
                                    select_methods)
from personaedit.bench.runner import check_resumable, run_bench
from personaedit.bench.store import ResultStore

__all__ = ["Cell", "ResultStore", "check_resumable", "expand_grid", "parse_method_options", "parse_personas", "parse_strengths", "run_bench", "select_methods"]
