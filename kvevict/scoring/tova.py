"""TOVA (Oren et al., 2024): keep what the most recent query attends to most."""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, attention_probs


class TOVA(Scorer):
    name = "tova"
    query_window = 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return attention_probs(inputs)[:, :, -1]
