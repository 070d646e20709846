"""Selection: who stays under the budget, given scores. Separate from scoring.

Layer-scope allocators decide inside one layer, at that layer's forward pass. The global allocator
decides across all full-attention layers at once, at the end of the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class SelectionInputs:
    """Scores ``[B, H, S]`` with the slot masks ``valid`` and ``protected`` (both ``[B, H, S]``)
    and the per-row budget ``budget`` ``[B]`` in entries per KV head of this layer. ``image``
    ``[B, H, S]`` marks image entries, if known."""

    scores: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    budget: torch.Tensor
    image: torch.Tensor | None = None

    def ranked(self) -> torch.Tensor:
        """Scores with protected slots at +inf and empty slots at -inf (float32)."""
        return torch.where(self.protected, torch.inf, self.scores.float()).masked_fill(~self.valid, -torch.inf)


class Allocator:
    """Base class of allocators: turn scores into a keep mask ``[B, H, S]``.

    Contract: empty slots are never kept; the cache adds the protected slots to whatever is kept.
    ``needs_budget`` = False means the allocator sets the budget itself (threshold); ``headwise``
    = True means heads of a layer trade entries, so only a row's total is held to the budget.
    """

    name: ClassVar[str]
    scope: ClassVar[str] = "layer"
    needs_budget: ClassVar[bool] = True
    headwise: ClassVar[bool] = False

    def layer_factor(self, depth: int, num_layers: int) -> float:
        """The ``depth``-th full-attention layer's share of the average per-head budget (1.0: every layer gets the budget)."""
        return 1.0

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        raise NotImplementedError

    def check_scorer(self, scorer) -> None:
        """Raise if this allocator cannot use ``scorer``'s scores."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def topk_per_head(ranked: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[B, H, S]``: per (row, head) the ``budget`` (``[B]`` or ``[B, H]``) best slots of
    ``ranked`` that are not ``-inf``."""
    budget = budget.to(ranked.device).reshape(budget.shape[0], -1, 1)
    slots = ranked.shape[-1]
    k = min(int(budget.max()), slots) if budget.numel() else 0
    if 2 * k <= slots:
        values, index = ranked.topk(k, dim=-1)
        within = torch.arange(k, device=ranked.device) < budget
        return torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, index, within & (values > -torch.inf))
    # Most slots stay: finding the few to drop (the lowest) is cheaper than ranking the kept ones.
    drop = slots - min(int(budget.min()), slots)
    _, index = ranked.topk(drop, dim=-1, largest=False)
    dropped = torch.arange(drop, device=ranked.device) < slots - budget
    keep = torch.ones_like(ranked, dtype=torch.bool).scatter(-1, index, ~dropped.expand(index.shape))
    return keep & (ranked > -torch.inf)


class Uniform(Allocator):
    """Every KV head of every layer keeps its own top-``budget`` entries."""

    name = "uniform"

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return topk_per_head(inputs.ranked(), inputs.budget)


class Pyramid(Uniform):
    """PyramidKV-style: per-layer budgets falling linearly with depth, averaging to the budget.

    Layer ``l`` of ``L`` keeps ``budget * (1 + spread * (1 - 2 l / (L - 1)))`` entries per head.
    """

    name = "pyramid"

    def __init__(self, spread: float = 0.5) -> None:
        if not 0.0 <= spread < 1.0:
            raise ValueError(f"pyramid spread must lie in [0, 1), got {spread}")
        self.spread = spread

    def layer_factor(self, depth: int, num_layers: int) -> float:
        if num_layers == 1:
            return 1.0
        return 1.0 + self.spread * (1.0 - 2.0 * depth / (num_layers - 1))


class AdaKV(Allocator):
    """AdaKV-style head-wise budgets: the layer's ``H x budget`` entries go to the best scores of any
    head, after each head got a safeguard of ``floor x budget`` of its own best entries."""

    name = "adakv"
    headwise = True

    def __init__(self, floor: float = 0.2) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"adakv floor must lie in [0, 1], got {floor}")
        self.floor = floor

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        ranked = inputs.ranked()
        b, h, s = ranked.shape
        safeguard = torch.ceil(inputs.budget.double() * self.floor).long()
        keep = topk_per_head(ranked, safeguard)
        extra = (h * inputs.budget - keep.sum((1, 2))).clamp(min=0)  # [B]
        more = topk_per_head(ranked.masked_fill(keep, -torch.inf).view(b, 1, h * s), extra)
        return keep | more.view(b, h, s)


class Quota(Allocator):
    """Image and text entries each get their share of every head's budget and keep their best.

    ``image_share`` fixes the image share; ``None`` makes it the share of image entries held. A
    modality that needs less than its share leaves the rest to the other.
    """

    name = "quota"

    def __init__(self, image_share: float | None = None) -> None:
        if image_share is not None and not 0.0 <= image_share <= 1.0:
            raise ValueError(f"image_share must lie in [0, 1], got {image_share}")
        self.image_share = image_share

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        ranked = inputs.ranked()
        if inputs.image is None:
            return topk_per_head(ranked, inputs.budget)
        image = inputs.image & inputs.valid
        text = inputs.valid & ~inputs.image
        n_image, n_text = image.sum(-1), text.sum(-1)  # [B, H]
        budget = inputs.budget.to(ranked.device).view(-1, 1)
        share = n_image / (n_image + n_text).clamp(min=1) if self.image_share is None else self.image_share
        want = torch.round(budget * share).long()
        image_budget = torch.minimum(n_image, torch.maximum(want, budget - n_text))  # [B, H]
        # protected entries (kept whatever their modality's share) count against that share
        protected_image = (inputs.protected & image).sum(-1)
        protected_text = (inputs.protected & text).sum(-1)
        image_budget = torch.minimum(torch.maximum(image_budget, protected_image), budget - protected_text)
        text_budget = budget - image_budget
        keep = topk_per_head(ranked.masked_fill(~image, -torch.inf), image_budget)
        return keep | topk_per_head(ranked.masked_fill(~text, -torch.inf), text_budget)

    def __repr__(self) -> str:
        return f"Quota(image_share={self.image_share})"


class Threshold(Allocator):
    """Keep every entry scoring at least ``tau`` (DMS / KVzap style): the budget adapts to the input."""

    name = "threshold"
    needs_budget = False

    def __init__(self, tau: float) -> None:
        self.tau = float(tau)

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return inputs.valid & (inputs.scores >= self.tau)

    def __repr__(self) -> str:
        return f"Threshold(tau={self.tau})"


class Global(Allocator):
    """One budget for all full-attention layers and heads: global top-k of the scores.

    Needs scores on one scale: a calibrated scorer, or a normalisation of each (row, layer, head)'s
    scores over its entries: ``"sum"`` (shares of the head's total, for non-negative scores such as
    attention) or ``"zscore"``. ``floor`` > 0 first gives every head its ``floor x budget`` best
    entries (inside the total), so no head is starved.

    Heads that keep different numbers of entries leave empty slots in the padded storage, so the
    bytes held exceed the budget. ``balance=True`` spends the budget on layers only: every head of a
    layer keeps its own best ``n_l`` entries, where layer ``l``'s ``r``-th slot is worth the best of its
    heads' ``r``-th scores; then the budget is the memory held. With ``floor``, every layer first gets
    ``floor x`` its even share.
    """

    name = "global"
    scope = "global"

    def __init__(self, normalize: str | None = None, floor: float = 0.0, balance: bool = False) -> None:
        if normalize not in (None, "sum", "zscore"):
            raise ValueError(f"global normalize must be None, 'sum' or 'zscore', got {normalize!r}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"global floor must lie in [0, 1], got {floor}")
        self.normalize, self.floor, self.balance = normalize, floor, balance

    def check_scorer(self, scorer) -> None:
        if self.normalize is None and not scorer.calibrated:
            raise ValueError(
                f"global top-k compares scores across layers and heads, but {scorer.name!r} scores are not "
                "calibrated to one scale; use Global(normalize='sum' or 'zscore') (names: 'global-sum:', "
                "'global-zscore:') or a calibrated policy"
            )

    def select_all(self, layers: list[SelectionInputs], total: torch.Tensor) -> list[torch.Tensor]:
        """Keep masks for every layer, ``total`` ``[B]`` entries per row across them all."""
        ranked = [self._normalized(x) for x in layers]
        if self.balance:
            return self._select_balanced(ranked, total)
        if self.floor > 0:  # each head's best floor x budget entries go first
            ranked = [r.masked_fill(topk_per_head(r, self._floor(ranked, total)), torch.inf) for r in ranked]
        flat = torch.cat([r.flatten(1) for r in ranked], dim=1)  # [B, N]
        keep = topk_per_head(flat[:, None], total)[:, 0]
        out, start = [], 0
        for x, r in zip(layers, ranked):
            n = r[0].numel()
            out.append(keep[:, start : start + n].view_as(r))
            start += n
        return out

    def _select_balanced(self, ranked: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
        """Keep masks giving every head of layer ``l`` the same ``n_l`` (``[B]``) best entries."""
        heads = ranked[0].shape[1]
        # Layer l's r-th slot (for all its heads) is worth its heads' best r-th score: [B, S_l]
        curves = [r.sort(-1, descending=True).values.amax(1) for r in ranked]
        if self.floor > 0:  # each layer's first floor x budget slots go first
            floor = self._floor(ranked, total)[:, None]
            curves = [c.masked_fill(torch.arange(c.shape[-1], device=c.device) < floor, torch.inf) for c in curves]
        chosen = topk_per_head(torch.cat(curves, dim=1)[:, None], torch.div(total, heads, rounding_mode="floor"))
        counts = [part.sum(-1) for part in chosen[:, 0].split([c.shape[-1] for c in curves], dim=-1)]  # [B] each
        return [topk_per_head(r, n) for r, n in zip(ranked, counts)]

    def _floor(self, ranked: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        """``[B]`` entries guaranteed to each head: ``floor x`` an even share of ``total``."""
        return torch.ceil(total.double() / sum(r.shape[1] for r in ranked) * self.floor).long()

    def _normalized(self, x: SelectionInputs) -> torch.Tensor:
        s = x.scores.float()
        if self.normalize == "sum":
            if bool((s[x.valid] < 0).any()):
                raise ValueError("global 'sum' normalisation needs non-negative scores; use 'zscore'")
            s = s / s.masked_fill(~x.valid, 0).sum(-1, keepdim=True).clamp(min=1e-30)
        elif self.normalize == "zscore":
            n = x.valid.sum(-1, keepdim=True).clamp(min=1)
            mean = s.masked_fill(~x.valid, 0).sum(-1, keepdim=True) / n
            var = ((s - mean) ** 2).masked_fill(~x.valid, 0).sum(-1, keepdim=True) / n
            s = (s - mean) / var.sqrt().clamp(min=1e-12)
        return torch.where(x.protected, torch.inf, s).masked_fill(~x.valid, -torch.inf)

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        raise RuntimeError("the global allocator selects across layers (select_all), not per layer")

    def __repr__(self) -> str:
        return f"Global(normalize={self.normalize!r}, floor={self.floor}, balance={self.balance})"


# Allocators a policy name can give (``Threshold`` needs its ``tau``: build it directly).
ALLOCATORS: dict[str, type[Allocator] | tuple[type[Allocator], dict]] = {
    "uniform": Uniform,
    "pyramid": Pyramid,
    "adakv": AdaKV,
    "quota": Quota,
    "global": Global,
    "global-sum": (Global, {"normalize": "sum"}),
    "global-zscore": (Global, {"normalize": "zscore"}),
    "global-balanced": (Global, {"balance": True}),
}


def make_allocator(name: str) -> Allocator:
    """Instantiate a registered allocator by name."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; known: {sorted(ALLOCATORS)}")
    entry = ALLOCATORS[name]
    cls, kwargs = entry if isinstance(entry, tuple) else (entry, {})
    return cls(**kwargs)


__all__ = ["ALLOCATORS", "AdaKV", "Allocator", "Global", "Pyramid", "Quota", "SelectionInputs", "Threshold", "Uniform",
           "make_allocator", "topk_per_head"]
