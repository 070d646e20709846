"""KeyDiff (Park et al., 2025): keep the keys least similar to the head's mean key.

The anchor is the mean of the raw keys (the paper averages unit-norm keys, so large keys weigh no
more than others there); the learned policy's key-novelty term reuses this score as calibrated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer, ScoreInputs, masked_mean


class KeyDiff(Scorer):
    name = "keydiff"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        anchor = masked_mean(keys, inputs.valid[..., None], dim=2)  # [B, H, D]
        return -F.cosine_similarity(keys, anchor[:, :, None, :], dim=-1)
