"""The check that ends a calibration: which allocator the learned policy should use by default.

Gates may be trained on shorter windows than the contexts they serve, so how their scores compare
across layers there is not trained, and a single global budget may share the memory out between layers worse than a fixed
per-layer one (uniform, or PyramidKV's decreasing with depth; the learned scores still rank the
entries inside each layer). Held-out text decides: each candidate allocator compresses windows of ``length``
tokens to each budget, and the one whose continuation stays closest to the full cache (mean KL over
windows and budgets) becomes the policy's default. Benchmark data is never used.

The check also reports a long-range KL: each scored token's KL weighted by its reach, the KL from the
full cache of a StreamingLLM cache that holds only the first tokens and the latest ones. Tokens that
only distant text predicts (a name, a number) weigh most, those any recent window predicts barely
count: the measure that compares gate sets on what eviction is for (the all-token KL averages those
few tokens away).

Given candidate lookaheads, the check then chooses one per budget for the chosen allocator: of those
that cost no continuation fidelity (mean KL within 1% of the lowest), the one with the lowest
long-range KL. A lookahead trades continuation fidelity for recall of distant entries, and how much
of either it buys depends on the budget.

Given candidate novelty weights (KeyDiff's signal added to the learned score), it last chooses the one
with the lowest mean KL over the budgets, under the chosen allocator and lookahead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from .cache import EvictionCache
from .evaluate import compare_continuations, continuation_logits
from .gates import RetentionGates
from .policy import Policy
from .scoring.learned import LearnedRetention
from .selection import make_allocator

CANDIDATES = ("global-balanced", "uniform", "pyramid")
LOCAL = 512  # entries per head of the StreamingLLM cache whose errors give each token's reach
LOOKAHEAD_TOLERANCE = 0.01  # a lookahead may cost this much mean KL (relative) for a lower long-range KL


def reach_weighted(kl: torch.Tensor, reach: torch.Tensor) -> float:
    """Mean of per-token ``kl`` ``[T]`` weighted by ``reach`` ``[T]`` (both KLs, so >= 0 up to rounding)."""
    reach = reach.clamp(min=0)
    return ((reach * kl).sum() / reach.sum().clamp(min=1e-12)).item()


class HeldOut:
    """Windows of ``length`` tokens of held-out ``ids`` (``windows`` of them, centred in equal parts of
    the text), their full-cache continuations and each scored token's reach.

    The last ``min(512, length // 4)`` tokens of each window are scored; the rest is compressed. The
    reach comes from a StreamingLLM cache of ``min(LOCAL, prefix // 4)`` entries per head."""

    def __init__(self, model: PreTrainedModel, ids: list[int], length: int, windows: int = 2, chunk: int = 512) -> None:
        if len(ids) < windows * length:
            raise ValueError(f"validation needs {windows} windows of {length} tokens, the text has {len(ids)}")
        part = len(ids) // windows
        starts = [i * part + (part - length) // 2 for i in range(windows)]
        self.model, self.chunk = model, chunk
        self.docs = [torch.tensor([ids[s : s + length]], device=model.device) for s in starts]
        self.prefix = length - min(512, length // 4)
        self.full = [continuation_logits(model, d, self.prefix, DynamicCache(config=model.config), chunk)[0]
                     for d in self.docs]
        self.reach = self.token_kls("streaming", min(LOCAL, self.prefix // 4))

    def token_kls(self, policy: str | Policy, budget: int | float) -> torch.Tensor:
        """Per-token KL ``[windows x (scored - 1)]`` (each scored token but the last predicts the next) of
        ``policy`` at ``budget`` on every window."""
        kls = []
        for d, ref in zip(self.docs, self.full):
            cache = EvictionCache(self.model, policy, budget=budget)
            logits = continuation_logits(self.model, d, self.prefix, cache, self.chunk)[0]
            kls.append(compare_continuations(ref, logits, d[0, self.prefix + 1 :])[3])
        return torch.cat(kls)

    def kl(self, policy: str | Policy, budget: int | float) -> tuple[float, float]:
        """The mean KL and the long-range KL of ``policy`` at ``budget``."""
        kl = self.token_kls(policy, budget)
        return kl.mean().item(), reach_weighted(kl, self.reach)


def choose_allocator(held_out: HeldOut, gates: RetentionGates, budgets: tuple[float, ...] = (0.1, 0.25),
                     candidates: tuple[str, ...] = CANDIDATES,
                     lookahead: int | dict[float, int] = 0) -> tuple[str, dict]:
    """The candidate with the lowest mean KL on the ``held_out`` windows, and ``{candidate: {"kl": mean,
    "long_range_kl": mean, budget: KL, "long_range": {budget: long-range KL}}}`` (means over budgets).
    The learned score uses ``lookahead`` (:class:`.scoring.learned.LearnedRetention`)."""
    results: dict[str, dict] = {}
    for name in tqdm(candidates, desc="validate allocators"):
        per_budget, long_range = {}, {}
        for budget in budgets:
            policy = Policy(LearnedRetention(gates, lookahead), make_allocator(name))
            per_budget[str(budget)], long_range[str(budget)] = held_out.kl(policy, budget)
        results[name] = {"kl": sum(per_budget.values()) / len(per_budget),
                         "long_range_kl": sum(long_range.values()) / len(long_range), **per_budget, "long_range": long_range}
    return min(results, key=lambda n: results[n]["kl"]), results


def per_budget(entry: dict) -> dict[str, list[float]]:
    """:func:`choose_allocator`'s entry for one allocator as ``{budget: [KL, long-range KL]}``."""
    return {b: [entry[b], lr] for b, lr in entry["long_range"].items()}


def _kl_per_candidate(held_out: HeldOut, candidates: tuple, scorer: Callable[[Any], LearnedRetention], allocator: str,
                      budgets: tuple[float, ...], measured: tuple[Any, dict] | None, key: Callable[[Any], str],
                      desc: str) -> dict[str, dict]:
    """``{key(candidate): {budget: [KL, long-range KL]}}`` of ``scorer(candidate)`` under ``allocator`` on
    the ``held_out`` windows; ``measured`` = ``(candidate, its entry)`` is not measured again."""
    results: dict[str, dict] = {}
    for candidate in tqdm(candidates, desc=desc):
        if measured is not None and candidate == measured[0]:
            results[key(candidate)] = measured[1]
            continue
        policy = Policy(scorer(candidate), make_allocator(allocator))
        results[key(candidate)] = {str(b): list(held_out.kl(policy, b)) for b in budgets}
    return results


def choose_lookahead(held_out: HeldOut, gates: RetentionGates, allocator: str, candidates: tuple[int, ...],
                     budgets: tuple[float, ...] = (0.1, 0.25), measured: tuple[int, dict] | None = None,
                     tolerance: float = LOOKAHEAD_TOLERANCE) -> tuple[dict[str, int], dict]:
    """Per budget, of the candidate lookaheads (steps) whose mean KL on the ``held_out`` windows under
    ``allocator`` is within ``tolerance`` (relative) of the lowest, the one with the lowest long-range
    KL: ``{budget: steps}``, and ``{steps: {budget: [KL, long-range KL]}}``. ``measured`` = ``(steps,
    entry)``, :func:`choose_allocator`'s entry for ``allocator`` at that lookahead, spares measuring it
    again."""
    results = _kl_per_candidate(held_out, candidates, lambda steps: LearnedRetention(gates, steps), allocator, budgets,
                                None if measured is None else (measured[0], per_budget(measured[1])), str,
                                "validate lookaheads")
    chosen = {}
    for b in map(str, budgets):
        best = min(kl[b][0] for kl in results.values())
        near = [n for n, kl in results.items() if kl[b][0] <= best * (1 + tolerance)]
        chosen[b] = int(min(near, key=lambda n: results[n][b][1]))
    return chosen, results


def choose_novelty(held_out: HeldOut, gates: RetentionGates, allocator: str, lookahead: int | dict,
                   candidates: tuple[float, ...], budgets: tuple[float, ...] = (0.1, 0.25),
                   measured: tuple[float, dict] | None = None) -> tuple[float, dict]:
    """Of the candidate novelty weights, the one with the lowest mean KL over ``budgets`` on the
    ``held_out`` windows under ``allocator`` and ``lookahead``; and ``{weight: {budget: [KL, long-range
    KL]}}``. ``measured`` = ``(weight, {budget: [KL, long-range KL]})`` spares measuring that one again."""
    results = _kl_per_candidate(held_out, candidates, lambda weight: LearnedRetention(gates, lookahead, novelty=weight),
                                allocator, budgets, measured, lambda weight: f"{weight:g}", "validate novelty")
    best = min(results, key=lambda w: sum(kl[0] for kl in results[w].values()))
    return float(best), results
