"""Policies = a scorer (what an entry is worth) x an allocator (who stays), and the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .gates import load_gates
from .scoring import DART, SCORERS, CriticalKV, Scorer
from .scoring.learned import EVIDENCE, EVIDENCE_WEIGHT, LearnedRetention
from .selection import Allocator, make_allocator

CRITICAL = "critical-"


@dataclass(frozen=True)
class Policy:
    """A scorer composed with an allocator, e.g. ``Policy(StreamingLLM(), Uniform())``; without one, the
    scorer's ``default_allocator``."""

    scorer: Scorer
    allocator: Allocator = None  # type: ignore[assignment]  # set from the scorer in __post_init__

    def __post_init__(self) -> None:
        if self.allocator is None:
            object.__setattr__(self, "allocator", make_allocator(self.scorer.default_allocator))
        self.allocator.check_scorer(self.scorer)

    def __str__(self) -> str:
        return f"{self.allocator.name}:{self.scorer.name}"


def available_policies() -> list[str]:
    """Scorer names accepted by :func:`resolve_policy` (each may take an ``allocator:`` prefix)."""
    names = sorted(SCORERS)
    critical = [f"{CRITICAL}{n}" for n in names if SCORERS[n].nonnegative]  # CriticalKV weighs attention mass
    return (names + critical + ["dart"] + [f"dart+{n}" for n in names]
            + [LearnedRetention.name] + [f"{LearnedRetention.name}+{n}" for n in sorted(EVIDENCE)])


def resolve_policy(spec: str | Policy | Scorer, config: PretrainedConfig | None = None) -> Policy:
    """Turn a name, a :class:`Scorer` or a :class:`Policy` into a Policy.

    Names are ``[allocator:]scorer``: ``"snapkv"`` (uniform allocation), ``"adakv:snapkv"``,
    ``"pyramid:critical-tova"`` (CriticalKV reweighting of TOVA), ``"global-sum:h2o"``, ``"dart"`` /
    ``"dart+snapkv"`` (DART for image entries, StreamingLLM or SnapKV for text, under per-modality
    quotas by default), ``"learned"`` (the calibrated policy shipped for the model of ``config``, under
    the allocator its calibration chose: one balanced global budget, or fixed per-layer shares such as
    PyramidKV's), ``"learned+snapkv"`` / ``"learned+h2o"`` (the same gates plus observed attention,
    SnapKV's or H2O's estimate, at ``EVIDENCE_WEIGHT``); ``"learned@512"`` / ``"learned+snapkv@512"``
    set the learned score's lookahead (steps; by default the card's, which may depend on the budget);
    ``"learned~0.5"`` / ``"learned@256~0"`` the weight of its key-novelty term (by default the card's).
    A threshold needs its ``tau``: ``Policy(scorer, Threshold(tau))``.
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Scorer):
        return Policy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"policy must be a name, a Scorer or a Policy, got {type(spec).__name__}")
    allocator_name, _, scorer_name = spec.rpartition(":")
    scorer = _scorer(scorer_name, spec, config)
    allocator_name = allocator_name or scorer.default_allocator
    try:
        allocator = make_allocator(allocator_name)
    except ValueError as e:  # name the policy, and where thresholds go
        raise ValueError(f"{e} (in policy {spec!r}; a threshold needs its tau: Policy(scorer, Threshold(tau)) "
                         "with budget=None)") from None
    return Policy(scorer, allocator)


def _scorer(name: str, spec: str, config: PretrainedConfig | None) -> Scorer:
    if name == DART.name or name.startswith(f"{DART.name}+"):
        text = name.partition("+")[2]
        return DART(_scorer(text, spec, config) if text else None)
    if name.startswith(CRITICAL):
        return CriticalKV(_scorer(name.removeprefix(CRITICAL), spec, config))
    rest, tilde, novelty = name.partition("~")
    base, at, steps = rest.partition("@")
    learned, _, evidence = base.partition("+")
    if learned == LearnedRetention.name and (not evidence or evidence in EVIDENCE):
        if at and not steps.isdigit():
            raise ValueError(f"the lookahead after '@' in policy {spec!r} must be a whole number of steps "
                             f"(e.g. learned@512), got {steps!r}")
        if tilde and not _is_number(novelty):
            raise ValueError(f"the novelty after '~' in policy {spec!r} must be a number (e.g. learned~0.5), "
                             f"got {novelty!r}")
        if config is None:
            raise ValueError("the learned policy is calibrated per model: resolve it with the model's config")
        gates, card = load_gates(config)
        settings = {"attention_weight": EVIDENCE_WEIGHT, "evidence": evidence} if evidence else {}
        if at:
            settings["lookahead"] = int(steps)
        if tilde:
            settings["novelty"] = float(novelty)
        return LearnedRetention.from_card(gates, card, **settings)
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r} in policy {spec!r}; known: {available_policies()}")
    return SCORERS[name]()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
