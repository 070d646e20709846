"""The learned, cross-layer calibrated retention policy ("Make Each Token Count").

Each entry gets ``log beta`` from the retention gates when it is created (from the layer's attention
input); at step ``t`` it is worth ``(t + 1 - i) log beta_i``, optionally with a lookahead of ``n``
steps: ``(t + 1 - i) log beta + log(1 - beta^n) - log(1 - beta)`` (the entry's expected total
retention over the next ``n`` steps). Scores share one scale across layers and heads, so the policy
pairs with the global allocator (one budget for the whole model) or a threshold.
"""

from __future__ import annotations

import torch

from ..gates import RetentionGates
from .base import Scorer, ScoreInputs


class LearnedRetention(Scorer):
    name = "learned"
    observes = True
    calibrated = True
    needs_hidden = True

    def __init__(self, gates: RetentionGates, lookahead: int = 0) -> None:
        self.gates, self.lookahead = gates, lookahead

    @torch.no_grad()
    def observe(self, inputs: ScoreInputs) -> None:
        """Score the entries this forward pass created (the last ``q`` slots)."""
        q = inputs.hidden.shape[1]
        log_beta = self.gates(inputs.hidden, inputs.layer_idx).to(inputs.keys.device)  # [B, H, q]
        state = inputs.state
        if "log_beta" not in state:
            state["log_beta"] = torch.zeros(inputs.positions.shape, device=inputs.keys.device)
        state["log_beta"][..., -q:] = log_beta.float()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        log_beta = inputs.state["log_beta"]
        age = (inputs.seen - inputs.positions).clamp(min=1).float()
        score = age * log_beta
        if self.lookahead:
            score = score + torch.log1p(-torch.exp(self.lookahead * log_beta).clamp(max=1 - 1e-6))
            score = score - torch.log1p(-torch.exp(log_beta).clamp(max=1 - 1e-6))
        return score
