"""The key/value cache's name in a forward call, across transformers versions.

transformers 5 calls the KV cache argument and output field `cache` and warns on every call that still uses
`past_key_values` (the name of earlier versions); code that continues a forward pass goes through here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _argument_for(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(model: Any) -> str:
    """The keyword `model.forward` takes the KV cache by."""
    return _argument_for(type(model).forward)


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (None when it returned none)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
