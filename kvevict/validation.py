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
"""

from __future__ import annotations

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


def reach_weighted(kl: torch.Tensor, reach: torch.Tensor) -> float:
    """Mean of per-token ``kl`` ``[T]`` weighted by ``reach`` ``[T]`` (both KLs, so >= 0 up to rounding)."""
    reach = reach.clamp(min=0)
    return ((reach * kl).sum() / reach.sum().clamp(min=1e-12)).item()


def choose_allocator(model: PreTrainedModel, gates: RetentionGates, ids: list[int], length: int,
                     budgets: tuple[float, ...] = (0.1, 0.25), windows: int = 2,
                     candidates: tuple[str, ...] = CANDIDATES, chunk: int = 512, lookahead: int = 0) -> tuple[str, dict]:
    """The candidate with the lowest mean KL on ``windows`` held-out windows of ``length`` tokens of
    ``ids`` (centred in equal parts of the text), and ``{candidate: {"kl": mean, "long_range_kl": mean,
    budget: KL, "long_range": {budget: long-range KL}}}`` (means over budgets).

    The last ``min(512, length // 4)`` tokens of each window are scored; the rest is compressed. The
    reach comes from a StreamingLLM cache of ``min(LOCAL, prefix // 4)`` entries per head. The learned
    score uses ``lookahead`` (:class:`.scoring.learned.LearnedRetention`)."""
    if len(ids) < windows * length:
        raise ValueError(f"validation needs {windows} windows of {length} tokens, the text has {len(ids)}")
    part = len(ids) // windows
    starts = [i * part + (part - length) // 2 for i in range(windows)]
    docs = [torch.tensor([ids[s : s + length]], device=model.device) for s in starts]
    prefix = length - min(512, length // 4)
    full = [continuation_logits(model, d, prefix, DynamicCache(config=model.config), chunk)[0] for d in docs]

    def token_kls(policy: str | Policy, budget: int | float) -> torch.Tensor:
        """Per-token KL ``[windows x scored]`` of ``policy`` at ``budget`` on every window."""
        kls = []
        for d, ref in zip(docs, full):
            logits = continuation_logits(model, d, prefix, EvictionCache(model, policy, budget=budget), chunk)[0]
            kls.append(compare_continuations(ref, logits, d[0, prefix + 1 :])[3])
        return torch.cat(kls)

    reach = token_kls("streaming", min(LOCAL, prefix // 4))
    results: dict[str, dict] = {}
    for name in tqdm(candidates, desc="validate allocators"):
        per_budget, long_range = {}, {}
        for budget in budgets:
            kl = token_kls(Policy(LearnedRetention(gates, lookahead), make_allocator(name)), budget)
            per_budget[str(budget)] = kl.mean().item()
            long_range[str(budget)] = reach_weighted(kl, reach)
        results[name] = {"kl": sum(per_budget.values()) / len(per_budget),
                         "long_range_kl": sum(long_range.values()) / len(long_range), **per_budget, "long_range": long_range}
    return min(results, key=lambda n: results[n]["kl"]), results
