"""The scorer contract: what each stored entry is worth (higher = keep)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may look at in one layer.

    keys ``[B, H, S, D]`` (after RoPE), values ``[B, H, S, Dv]``, positions ``[B, H, S]`` (logical
    token index, ``-1`` for an empty slot). ``queries`` ``[B, Hq, w, D]`` (after RoPE) are the last
    ``w`` queries at their logical ``query_positions`` ``[w]``; ``query_real`` ``[B, w]`` marks the
    ones that are not padding. For :meth:`Scorer.score` they are the recent-query window (``w`` up
    to ``Scorer.query_window``); for :meth:`Scorer.observe` the queries of the current forward pass.
    ``state`` holds per-slot tensors ``[B, H, S, ...]`` the scorer owns (gathered on eviction).
    ``module`` is the attention module (e.g. for its output projection), ``scaling`` its softmax scale.
    ``image`` ``[B, H, S]`` marks image entries (``None`` when the cache was not told of any).
    ``hidden`` ``[B, q, D]`` is the layer's attention input for the newest ``q`` entries (only for
    :meth:`Scorer.observe`, and only when the scorer ``needs_hidden``): the current forward pass's, or
    for a scorer that ``scores_late``, possibly those of several passes. ``kept`` ``[B]`` is the fraction
    of its real tokens each row's budget keeps (only for :meth:`Scorer.score` in a selection under a budget).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    layer_idx: int
    seen: int
    scaling: float
    state: dict[str, torch.Tensor]
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    query_real: torch.Tensor | None = None  # always given with queries
    module: torch.nn.Module | None = None
    image: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    kept: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """``[B, H, S]`` bool: slots holding an entry."""
        return self.positions >= 0


class Scorer:
    """Base class of scorers. Subclasses set ``name`` and implement :meth:`score`.

    What a scorer needs is declared, so the cache computes nothing it does not use:
    ``query_window`` > 0 keeps that many recent queries per layer for :meth:`score`;
    ``observes`` = True calls :meth:`observe` after every forward pass with its queries;
    ``needs_hidden`` = True also hands it the layer's attention input (the cache hooks the model).
    ``calibrated`` = True promises scores on one scale across layers and heads (needed by the
    global allocator without normalisation); ``nonnegative`` = True promises scores >= 0 (needed
    to reweight them multiplicatively, as CriticalKV does). ``scores_late`` = True says :meth:`observe`
    reads nothing but the new entries' own ``hidden``, so it may run some forward passes late: under a
    global budget the cache then scores new entries in batches over layers and decoding steps (always
    before a selection). ``accumulates`` = True says :meth:`observe` adds every query's share to entries
    already stored (H2O's sums), which a crop cannot take out again, so the cache is then never croppable.
    ``default_allocator`` names the allocator the scorer gets when a policy name gives none.
    """

    name: ClassVar[str]
    query_window: int = 0
    observes: ClassVar[bool] = False
    accumulates: bool = False
    calibrated: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False
    nonnegative: ClassVar[bool] = False
    scores_late: bool = False
    default_allocator: str = "uniform"  # the allocator a bare name (``"snapkv"``) gets

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return ``[B, H, S]`` float scores; higher means more worth keeping."""
        raise NotImplementedError

    def observe(self, inputs: ScoreInputs) -> None:
        """Update ``inputs.state`` from the current forward pass (only when ``observes``)."""

    def observe_layers(self, inputs: list[ScoreInputs]) -> None:
        """:meth:`observe` for several layers at once (same-shaped inputs; the cache batches deferred
        scoring this way); override to batch the work."""
        for x in inputs:
            self.observe(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WrappedScorer(Scorer):
    """A scorer built on another: it needs (and observes) what its base needs."""

    def __init__(self, base: Scorer) -> None:
        self.base = base
        self.query_window, self.observes, self.needs_hidden = base.query_window, base.observes, base.needs_hidden
        self.accumulates = base.accumulates

    def observe(self, inputs: ScoreInputs) -> None:
        self.base.observe(inputs)


def query_window(window: int, scorer: str) -> int:
    """Check a scorer's query window (how many recent queries it reads): a positive int."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{scorer} needs a query window of at least 1 query, got {window!r}")
    return window


def attention_probs(inputs: ScoreInputs, block: int = 256) -> torch.Tensor:
    """Causal softmax attention of ``inputs.queries`` over the stored entries.

    Returns ``[B, H, w, S]`` float32: per KV head, averaged over its query group; rows of padding
    queries are zero. Computed in query blocks to bound memory.
    """
    q = inputs.queries
    b, hq, w, d = q.shape
    h = inputs.keys.shape[1]
    keys = inputs.keys.float()
    kv_pos = inputs.positions[:, :, None, None, :]  # [B, H, 1, 1, S]
    out = []
    for start in range(0, w, block):
        qb = q[:, :, start : start + block].float().reshape(b, h, hq // h, -1, d)
        logits = torch.einsum("bhgqd,bhsd->bhgqs", qb, keys) * inputs.scaling
        q_pos = inputs.query_positions[start : start + block].view(1, 1, 1, -1, 1)
        visible = (kv_pos >= 0) & (kv_pos <= q_pos)
        probs = logits.masked_fill(~visible, -torch.inf).softmax(-1).nan_to_num(0.0).mean(2)
        probs = probs * inputs.query_real[:, None, start : start + block, None]
        out.append(probs)
    return torch.cat(out, dim=2)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (broadcastable) is set."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
