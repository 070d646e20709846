"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention received.

Every forward pass adds the attention each entry receives from the new queries; the score is that
sum divided by the number of queries that could see the entry (the normalised variant: old
entries are not favoured merely for having been visible longer; the paper keeps the raw sum).
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, attention_probs


class H2O(Scorer):
    name = "h2o"
    nonnegative = True
    observes = True
    accumulates = True

    def observe(self, inputs: ScoreInputs) -> None:
        state = inputs.state
        if "h2o_sum" not in state:
            state["h2o_sum"] = torch.zeros(inputs.positions.shape, device=inputs.keys.device)
            state["h2o_count"] = torch.zeros(inputs.positions.shape, device=inputs.keys.device)
        probs = attention_probs(inputs)  # [B, H, q, S]
        q_pos = torch.where(inputs.query_real, inputs.query_positions[None, :], -1)  # [B, q]
        seen_by = (inputs.positions[:, :, None, :] <= q_pos[:, None, :, None]).sum(2)  # [B, H, S]
        state["h2o_sum"] += probs.sum(2)
        state["h2o_count"] += seen_by

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.state["h2o_sum"] / inputs.state["h2o_count"].clamp(min=1)
