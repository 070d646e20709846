"""DART (Wen et al., 2025) for cached image entries: duplication matters more than importance.

Per (row, KV head), pivots are the ``pivots`` image entries and ``pivots`` text entries with the
largest key L1 norm; an image entry's redundancy is its highest cosine similarity to a pivot,
measured on values (the cache has no hidden states, and keys carry RoPE, which would hide
duplicates at different positions). Image entries score ``1 - redundancy`` (pivots score 2, so
they stay); text entries are scored by another scorer (default StreamingLLM). The two modalities
live on different scales, so DART goes with the ``quota`` allocator, which splits the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer, ScoreInputs, WrappedScorer
from .streaming import StreamingLLM


class DART(WrappedScorer):
    name = "dart"

    def __init__(self, text: Scorer | None = None, pivots: int = 4) -> None:
        super().__init__(text or StreamingLLM())
        self.text, self.pivots = self.base, pivots
        if text is not None:
            self.name = f"dart+{text.name}"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = self.text.score(inputs).float()
        if inputs.image is None or not bool(inputs.image.any()):
            return scores
        image, valid = inputs.image, inputs.valid
        keys = inputs.keys.float()
        l1 = keys.abs().sum(-1)
        k = min(self.pivots, keys.shape[2])
        by_image = l1.masked_fill(~image, -torch.inf).topk(k, dim=-1)
        by_text = l1.masked_fill(~(valid & ~image), -torch.inf).topk(k, dim=-1)
        pivots = torch.cat([by_image.indices, by_text.indices], dim=-1)  # [B, H, 2k]
        pivot_ok = torch.cat([by_image.values, by_text.values], dim=-1) > -torch.inf
        unit = F.normalize(inputs.values.float(), dim=-1)
        pivot_keys = torch.gather(unit, 2, pivots[..., None].expand(-1, -1, -1, unit.shape[-1]))
        similarity = (unit @ pivot_keys.transpose(-1, -2)).masked_fill(~pivot_ok[:, :, None, :], -1.0)
        redundancy = similarity.amax(-1)  # [B, H, S]
        is_pivot = torch.zeros_like(image).scatter(-1, by_image.indices, by_image.values > -torch.inf)
        image_scores = torch.where(is_pivot, 2.0, 1.0 - redundancy)
        return torch.where(image, image_scores, scores)

    def __repr__(self) -> str:
        return f"DART(text={self.text!r}, pivots={self.pivots})"
