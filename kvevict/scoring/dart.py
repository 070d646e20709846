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
    default_allocator = "quota"

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
        l1 = inputs.keys.float().abs().sum(-1)
        unit = F.normalize(inputs.values.float(), dim=-1)
        k = min(self.pivots, l1.shape[-1])
        image_idx, image_ok = _pivots(l1, unit, image, k)
        text_idx, text_ok = _pivots(l1, unit, valid & ~image, k)
        pivots, pivot_ok = torch.cat([image_idx, text_idx], -1), torch.cat([image_ok, text_ok], -1)  # [B, H, 2k]
        pivot_vecs = torch.gather(unit, 2, pivots[..., None].expand(-1, -1, -1, unit.shape[-1]))
        similarity = (unit @ pivot_vecs.transpose(-1, -2)).masked_fill(~pivot_ok[:, :, None, :], -1.0)
        redundancy = similarity.amax(-1)  # [B, H, S]
        # count, not overwrite: a missing pivot (``image_ok`` False) points at slot 0, which may hold a real one
        found = torch.zeros(image.shape, dtype=torch.int32, device=image.device)
        is_pivot = found.scatter_add(-1, image_idx, image_ok.int()) > 0
        return torch.where(image, torch.where(is_pivot, 2.0, 1.0 - redundancy), scores)

    def __repr__(self) -> str:
        return f"DART(text={self.text!r}, pivots={self.pivots})"


def _pivots(l1: torch.Tensor, unit: torch.Tensor, candidates: torch.Tensor, k: int,
            same: float = 1 - 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pivots: ``k`` times the candidate with the largest key L1 norm, skipping exact duplicates
    (value cosine > ``same``) of pivots already taken. Returns indices and validity, ``[B, H, k]``."""
    left = candidates.clone()
    index, ok = [], []
    for _ in range(k):
        best = l1.masked_fill(~left, -torch.inf).argmax(-1, keepdim=True)  # [B, H, 1]
        found = torch.gather(left, -1, best)
        index.append(best)
        ok.append(found)
        vec = torch.gather(unit, 2, best[..., None].expand(-1, -1, -1, unit.shape[-1]))  # [B, H, 1, D]
        duplicate = (unit @ vec.transpose(-1, -2))[..., 0] > same
        left &= ~(duplicate & found)
    return torch.cat(index, -1), torch.cat(ok, -1)
