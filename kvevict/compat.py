"""How to hand a cache to a model across transformers 5.x releases.

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values``
to ``cache`` (the old name warns, and ``forward`` drops it in 5.40); earlier 5.x releases know only
``past_key_values``.
"""

from __future__ import annotations

import functools
import inspect

import torch


def cache_keyword(model: torch.nn.Module) -> str:
    """The name ``model.forward`` (and so ``generate``) takes the cache by: ``"cache"`` or ``"past_key_values"``."""
    return _keyword(type(model))


@functools.cache
def _keyword(cls: type) -> str:  # once per model class: callers ask at every forward pass
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """Keyword arguments passing ``cache`` to ``model(...)`` or ``model.generate(...)``:
    ``model(ids, **with_cache(model, cache))``."""
    return {cache_keyword(model): cache}
