"""SnapKV (Li et al., 2024): attention from the last ``window`` queries, smoothed by pooling.

Query-agnostic use: the cache compresses with the context's own last queries, before any question.
If the question is inside the compressed span its queries pick exactly what it asks for, which
flatters SnapKV-style scores; benchmarks here compress before the question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer, ScoreInputs, attention_probs, query_window


class SnapKV(Scorer):
    name = "snapkv"
    nonnegative = True

    def __init__(self, window: int = 32, kernel: int = 5) -> None:
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"SnapKV pooling kernel must be a positive odd number, got {kernel}")
        self.query_window, self.kernel = query_window(window, self.name), kernel

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        probs = attention_probs(inputs)  # [B, H, w, S]
        mean = probs.sum(2) / inputs.query_real.sum(-1).clamp(min=1)[:, None, None]
        b, h, s = mean.shape
        valid = inputs.valid.float().view(b * h, 1, s)
        pool = lambda x: F.avg_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2)  # noqa: E731
        # Pool over neighbouring entries only (holes left by eviction do not dilute the average).
        return (pool(mean.view(b * h, 1, s)) / pool(valid).clamp(min=1e-6)).view(b, h, s)
