"""The check that ends a calibration: the learned policy's defaults, chosen on held-out text.

Gates are trained on short windows, so how their scores compare across layers at longer contexts is
not trained, and a single global budget may share the memory out between layers worse than a fixed
per-layer one (uniform, or PyramidKV's decreasing with depth; the learned scores still rank the
entries inside each layer). Nor do the gates see what the context's latest queries attend to, which
may add to them. Held-out text decides both: first each candidate allocator compresses windows of
``length`` tokens to each budget with the gates alone, then, under the best allocator, each candidate
weight of observed attention (:class:`~kvevict.scoring.learned.LearnedRetention`'s
``attention_weight``); the lowest mean KL to the full cache (over windows and budgets) gives the
policy's defaults. Benchmark data is never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from .cache import EvictionCache
from .evaluate import continuation_logits, fidelity
from .gates import RetentionGates
from .policy import Policy
from .scoring.learned import LearnedRetention
from .selection import make_allocator

CANDIDATES = ("global-balanced", "uniform", "pyramid")
ATTENTION_WEIGHTS = (0.25, 0.5, 1.0)  # tried under the chosen allocator, against 0 (the gates alone)


@dataclass(frozen=True)
class Defaults:
    """What the check chose, and the mean KL of every candidate: ``{name: {"kl": mean, budget: KL}}``
    (names: an allocator, or ``"<allocator>, attention <weight>"``)."""

    allocator: str
    attention_weight: float
    kl: dict[str, dict]


def choose_defaults(model: PreTrainedModel, gates: RetentionGates, ids: list[int], length: int,
                    budgets: tuple[float, ...] = (0.1, 0.25), windows: int = 2,
                    candidates: tuple[str, ...] = CANDIDATES, weights: tuple[float, ...] = ATTENTION_WEIGHTS,
                    chunk: int = 512) -> Defaults:
    """The allocator of ``candidates``, then the attention weight of ``(0,) + weights``, with the lowest
    mean KL on ``windows`` held-out windows of ``length`` tokens of ``ids`` (centred in equal parts of
    the text).

    The last ``min(512, length // 4)`` tokens of each window are scored; the rest is compressed."""
    if len(ids) < windows * length:
        raise ValueError(f"validation needs {windows} windows of {length} tokens, the text has {len(ids)}")
    part = len(ids) // windows
    starts = [i * part + (part - length) // 2 for i in range(windows)]
    docs = [torch.tensor([ids[s : s + length]]) for s in starts]
    prefix = length - min(512, length // 4)
    full = [continuation_logits(model, d, prefix, DynamicCache(config=model.config), chunk)[0] for d in docs]

    def mean_kl(allocator: str, weight: float) -> dict:
        per_budget = {}
        for budget in budgets:
            def make_cache() -> EvictionCache:
                scorer = LearnedRetention(gates, attention_weight=weight)
                return EvictionCache(model, Policy(scorer, make_allocator(allocator)), budget=budget)

            kls = [fidelity(model, d, prefix, make_cache, ref, chunk).kl for d, ref in zip(docs, full)]
            per_budget[str(budget)] = sum(kls) / len(kls)
        return {"kl": sum(per_budget.values()) / len(per_budget), **per_budget}

    with tqdm(total=len(candidates) + len(weights), desc="check allocators and attention weights") as bar:
        kl = {}
        for name in candidates:
            kl[name] = mean_kl(name, 0.0)
            bar.update()
        allocator = min(kl, key=lambda n: kl[n]["kl"])
        best = (kl[allocator]["kl"], 0.0)
        for weight in weights:
            kl[f"{allocator}, attention {weight:g}"] = result = mean_kl(allocator, weight)
            best = min(best, (result["kl"], weight))
            bar.update()
    return Defaults(allocator, best[1], kl)
