"""Expected Attention (Devoto et al., 2025): attention that future queries are expected to pay.

Future queries are modelled as Gaussian with the mean ``mu`` and covariance ``Sigma`` of the recent
query window; the expected logit of key ``k`` is ``k.mu * s + s^2 k^T Sigma k / 2`` (``s`` the
softmax scale), softmaxed over the entries and weighted by ``||v||``. Simplification: the window's
queries are taken after RoPE at their own positions (transformers' attention interface does not
expose pre-RoPE queries), so the rotation to future positions is not modelled, and the window's own
rotation shows up as variance (mostly in the fastest-turning dimensions): ``Sigma`` is not 0 even for
one query repeated at every position.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoreInputs, masked_mean, query_window


class ExpectedAttention(Scorer):
    name = "expected_attention"
    nonnegative = True

    def __init__(self, window: int = 64) -> None:
        self.query_window = query_window(window, self.name)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, hq, w, d = inputs.queries.shape
        h = inputs.keys.shape[1]
        q = inputs.queries.float().view(b, h, hq // h, w, d)
        weight = inputs.query_real[:, None, None, :, None]
        mu = masked_mean(q, weight, dim=3)  # [B, H, G, D]
        centred = (q - mu[:, :, :, None]) * weight
        sigma = centred.transpose(-1, -2) @ centred / weight.sum(3, keepdim=True).clamp(min=2).sub(1)  # [B,H,G,D,D]
        keys = inputs.keys.float()
        s = inputs.scaling
        logits = s * torch.einsum("bhsd,bhgd->bhgs", keys, mu)
        logits = logits + 0.5 * s * s * torch.einsum("bhsd,bhgde,bhse->bhgs", keys, sigma, keys)
        logits = logits.masked_fill(~inputs.valid[:, :, None], -torch.inf)
        probs = logits.softmax(-1).nan_to_num(0.0).mean(2)  # [B, H, S]
        return probs * inputs.values.float().norm(dim=-1)
