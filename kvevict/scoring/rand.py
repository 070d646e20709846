"""Random eviction: a lower bound every policy should beat."""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs


class RandomScorer(Scorer):
    name = "random"
    nonnegative = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        g = torch.Generator(device=inputs.keys.device).manual_seed(self.seed + 7919 * inputs.layer_idx + inputs.seen)
        return torch.rand(inputs.positions.shape, generator=g, device=inputs.keys.device)
