"""How kvevict reaches into transformers models: the cache argument, the attention modules and their input.

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


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's decoder (the model itself when it has no ``get_decoder``)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's attention modules (``*self_attn`` with a ``layer_idx``), first layer first."""
    return [m for name, m in decoder(model).named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]


def attention_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states ``[B, q, D]`` an attention module's forward receives (for forward pre-hooks)."""
    return kwargs.get("hidden_states", args[0] if args else None)
