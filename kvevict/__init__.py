"""kvevict: a KV-cache eviction runtime for Hugging Face transformers."""

from .attention import ATTN_IMPLEMENTATION, register
from .cache import EvictionCache, EvictingLayer, Protection
from .compat import with_cache
from .models import load_model
from .policy import Budget, Policy, available_policies, resolve_policy

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "Budget",
    "EvictingLayer",
    "EvictionCache",
    "Policy",
    "Protection",
    "available_policies",
    "load_model",
    "resolve_policy",
    "with_cache",
]
