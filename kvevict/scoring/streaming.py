"""StreamingLLM (Xiao et al., 2023): attention sinks plus the most recent tokens.

The sinks are the cache's protected first tokens; this scorer ranks the rest by recency.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs


class StreamingLLM(Scorer):
    name = "streaming"
    nonnegative = True

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.to(torch.float32)
