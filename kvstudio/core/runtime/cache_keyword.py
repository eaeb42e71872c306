"""The keyword a model's forward takes its cache under.

transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and is removed in 5.40,
after which it would fall into `**kwargs` and be silently ignored: a policy would never run). Before
5.24 there is no `cache` parameter, and `model(cache=c)` ignores `c` just as silently. So the name
is read from the signature of the model's own forward, never guessed from a version number.
"""

from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """'cache' when `model.forward` has that parameter, else 'past_key_values'."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the old name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for a forward or generate call. Never `cache or ...`: an empty Cache is falsy."""
    return {cache_keyword(model): cache}
