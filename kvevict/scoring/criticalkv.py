"""CriticalKV (Feng et al., 2025) reweighting: a score times the entry's output-projected value norm.

``||W_o v||`` measures how much an entry can move the layer's output; multiplying any scorer's
(non-negative) score by it favours entries that both draw attention and matter when they do.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, WrappedScorer


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
        b, h, s, dv = inputs.values.shape
        w = proj.weight.float()  # [hidden, Hq * Dv]
        hq = w.shape[1] // dv
        w_heads = w.view(-1, h, hq // h, dv)  # [hidden, H, G, Dv]
        gram = torch.einsum("ohgv,ohgu->hgvu", w_heads, w_heads)  # ||W v||^2 = v^T (W^T W) v
        v = inputs.values.float()
        norms = torch.einsum("bhsv,hgvu,bhsu->bhgs", v, gram, v).clamp(min=0).sqrt()
        return self.base.score(inputs).float() * norms.mean(2)

    def __repr__(self) -> str:
        return f"CriticalKV({self.base!r})"
