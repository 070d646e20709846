"""KNorm (Devoto et al., 2024): keys with a small L2 norm draw more attention; keep those."""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs


class KNorm(Scorer):
    name = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
