"""TOVA (Oren et al., 2024): keep what the most recent query attends to most.

Scored per KV head (averaged over the head's query group); the paper averages over all heads of a
layer and evicts the same token everywhere, which the uniform allocator does not require.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, attention_probs


class TOVA(Scorer):
    name = "tova"
    nonnegative = True
    query_window = 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return attention_probs(inputs)[:, :, -1]
