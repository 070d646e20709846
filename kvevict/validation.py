"""The check that ends a calibration: which allocator the learned policy should use by default.

Gates may be trained on shorter windows than the contexts they serve, so how their scores compare
across layers there is not trained, and a single global budget may share the memory out between layers worse than a fixed
per-layer one (uniform, or PyramidKV's decreasing with depth; the learned scores still rank the
entries inside each layer). Held-out text decides: each candidate allocator compresses windows of ``length``
tokens to each budget, and the one whose continuation stays closest to the full cache (mean KL over
windows and budgets) becomes the policy's default. Benchmark data is never used.
"""

from __future__ import annotations

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


def choose_allocator(model: PreTrainedModel, gates: RetentionGates, ids: list[int], length: int,
                     budgets: tuple[float, ...] = (0.1, 0.25), windows: int = 2,
                     candidates: tuple[str, ...] = CANDIDATES, chunk: int = 512) -> tuple[str, dict]:
    """The candidate with the lowest mean KL on ``windows`` held-out windows of ``length`` tokens of
    ``ids`` (centred in equal parts of the text), and ``{candidate: {"kl": mean, budget: KL}}``.

    The last ``min(512, length // 4)`` tokens of each window are scored; the rest is compressed."""
    if len(ids) < windows * length:
        raise ValueError(f"validation needs {windows} windows of {length} tokens, the text has {len(ids)}")
    part = len(ids) // windows
    starts = [i * part + (part - length) // 2 for i in range(windows)]
    docs = [torch.tensor([ids[s : s + length]], device=model.device) for s in starts]
    prefix = length - min(512, length // 4)
    full = [continuation_logits(model, d, prefix, DynamicCache(config=model.config), chunk)[0] for d in docs]
    results: dict[str, dict] = {}
    for name in tqdm(candidates, desc="validate allocators"):
        per_budget = {}
        for budget in budgets:
            def make_cache() -> EvictionCache:
                return EvictionCache(model, Policy(LearnedRetention(gates), make_allocator(name)), budget=budget)

            kls = [fidelity(model, d, prefix, make_cache, ref, chunk).kl for d, ref in zip(docs, full)]
            per_budget[str(budget)] = sum(kls) / len(kls)
        results[name] = {"kl": sum(per_budget.values()) / len(per_budget), **per_budget}
    return min(results, key=lambda n: results[n]["kl"]), results
