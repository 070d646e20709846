"""Policies = a scorer (what an entry is worth) x an allocator (who stays), and the budget."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch

from .scoring import SCORERS, CriticalKV, Scorer
from .selection import ALLOCATORS, Allocator, Uniform, make_allocator

CRITICAL = "critical-"


@dataclass(frozen=True)
class Policy:
    """A scorer composed with an allocator, e.g. ``Policy(StreamingLLM(), Uniform())``."""

    scorer: Scorer
    allocator: Allocator = field(default_factory=Uniform)

    def __post_init__(self) -> None:
        self.allocator.check_scorer(self.scorer)

    def __str__(self) -> str:
        return f"{self.allocator.name}:{self.scorer.name}"


def available_policies() -> list[str]:
    """Names accepted by :func:`resolve_policy`: ``[allocator:][critical-]scorer``."""
    return sorted(SCORERS) + sorted(f"{CRITICAL}{s}" for s in SCORERS) + [f"{a}:" for a in sorted(ALLOCATORS)]


def resolve_policy(spec: str | Policy | Scorer) -> Policy:
    """Turn a name, a :class:`Scorer` or a :class:`Policy` into a Policy.

    Names: ``"snapkv"`` (uniform allocation), ``"adakv:snapkv"``, ``"pyramid:critical-tova"``
    (CriticalKV reweighting of TOVA), ``"global-sum:h2o"``, ``"threshold:knorm"``.
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Scorer):
        return Policy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"policy must be a name, a Scorer or a Policy, got {type(spec).__name__}")
    allocator_name, _, scorer_name = spec.rpartition(":")
    allocator_name = allocator_name or "uniform"
    critical = scorer_name.startswith(CRITICAL)
    base_name = scorer_name.removeprefix(CRITICAL)
    if base_name not in SCORERS:
        raise ValueError(f"unknown scorer {base_name!r} in policy {spec!r}; known: {sorted(SCORERS)}")
    if allocator_name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator_name!r} in policy {spec!r}; known: {sorted(ALLOCATORS)}")
    scorer = SCORERS[base_name]()
    return Policy(CriticalKV(scorer) if critical else scorer, make_allocator(allocator_name))


@dataclass(frozen=True)
class Budget:
    """Entries kept per (layer, KV head): an int count, or a float fraction of the row's tokens.

    A fraction never goes below ``floor`` (the protected sinks + recent window), which stay kept.
    """

    value: int | float
    floor: int = 0

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"budget must be an int (entries) or a float fraction, got {v!r}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"a fractional budget must lie in (0, 1], got {v}")
        if isinstance(v, int) and v <= self.floor:
            raise ValueError(
                f"budget={v} entries must exceed the protected entries (sinks + recent window = {self.floor})"
            )

    def entries(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]`` entries each row may keep, given its ``[B]`` count of real tokens seen."""
        if isinstance(self.value, int):
            return torch.full_like(tokens, self.value)
        return torch.ceil(tokens.double() * self.value).long().clamp(min=self.floor)

    def entries_for(self, tokens: int) -> int:
        """Entries a row with ``tokens`` real tokens may keep (scalar form of :meth:`entries`)."""
        if isinstance(self.value, int):
            return self.value
        return max(math.ceil(tokens * self.value), self.floor)

    def __str__(self) -> str:
        return f"{self.value:g}" if isinstance(self.value, float) else str(self.value)


__all__ = ["Budget", "Policy", "available_policies", "resolve_policy"]
