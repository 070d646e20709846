"""CriticalKV (Feng et al., 2025) reweighting: a score times the entry's output-projected value norm.

``||W_o v||`` measures how much an entry can move the layer's output; multiplying any scorer's
(non-negative) score by it favours entries that both draw attention and matter when they do. One
stage: the paper (and kvpress's CriticalKVPress) first keeps half the budget by the plain score and
reweights only the rest, with the L1 norm of ``v W_o``.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, WrappedScorer


def output_norms(o_proj: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``||W_o^g v||`` ``[B, H, G, S]``: the norm of what each value ``[B, H, S, Dv]`` writes through the
    output projection ``o_proj`` ``[hidden, Hq * Dv]`` of each of the ``G = Hq / H`` query heads that share
    its KV head, as ``sqrt(v^T (W^T W) v)``."""
    h, dv = values.shape[1], values.shape[-1]
    w = o_proj.float()
    w_heads = w.view(w.shape[0], h, w.shape[1] // dv // h, dv)  # [hidden, H, G, Dv]
    gram = torch.einsum("ohgv,ohgu->hgvu", w_heads, w_heads)
    v = values.float()
    return torch.einsum("bhsv,hgvu,bhsu->bhgs", v, gram, v).clamp(min=0).sqrt()


class CriticalKV(WrappedScorer):
    """Wraps a non-negative scorer: ``score = base.score * mean over the group's heads of ||W_o[head] v||``."""

    nonnegative = True

    def __init__(self, base: Scorer) -> None:
        if not base.nonnegative:
            raise ValueError(
                f"CriticalKV multiplies scores by ||W_o v||, which needs non-negative scores; {base.name!r} "
                "scores can be negative (use an attention-based scorer such as snapkv, tova, h2o)"
            )
        super().__init__(base)
        self.name = f"critical-{base.name}"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        proj = getattr(inputs.module, "o_proj", None)
        if proj is None:
            raise ValueError(f"CriticalKV needs the attention module's o_proj; {type(inputs.module).__name__} has none")
        return self.base.score(inputs).float() * output_norms(proj.weight, inputs.values).mean(2)

    def __repr__(self) -> str:
        return f"CriticalKV({self.base!r})"
