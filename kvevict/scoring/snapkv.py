"""SnapKV (Li et al., 2024): attention from the last ``window`` queries, smoothed by pooling.

Query-agnostic use: the cache compresses with the context's own last queries, before any question.
If the question is inside the compressed span its queries pick exactly what it asks for, which
flatters SnapKV-style scores; benchmarks here compress before the question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer, ScoreInputs, attention_probs


class SnapKV(Scorer):
    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 5) -> None:
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"SnapKV pooling kernel must be a positive odd number, got {kernel}")
        self.query_window, self.kernel = window, kernel

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        probs = attention_probs(inputs)  # [B, H, w, S]
        real = inputs.query_real.sum(-1).clamp(min=1) if inputs.query_real is not None else probs.shape[2]
        mean = probs.sum(2) / (real[:, None, None] if torch.is_tensor(real) else real)
        b, h, s = mean.shape
        pooled = F.avg_pool1d(mean.view(b * h, 1, s), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(b, h, s)
