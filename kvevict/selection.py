"""Selection: who stays under the budget, given scores. Separate from scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class SelectionInputs:
    """Scores ``[B, H, S]`` with the slot masks ``valid`` and ``protected`` (both ``[B, H, S]``)
    and the per-row budget ``budget`` ``[B]`` in entries per KV head of this layer."""

    scores: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    budget: torch.Tensor
    layer_idx: int
    num_layers: int


class Allocator:
    """Base class of allocators: turn scores into a keep mask ``[B, H, S]``.

    Contract: protected valid slots are always kept; empty slots never are.
    """

    name: ClassVar[str]

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Uniform(Allocator):
    """Every KV head of every layer keeps its own top-``budget`` entries."""

    name = "uniform"

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        return topk_per_head(inputs.scores, inputs.valid, inputs.protected, inputs.budget)


def topk_per_head(
    scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Keep mask ``[B, H, S]``: per (row, head) the ``budget[row]`` best valid slots, protected first."""
    ranked = torch.where(protected, torch.inf, scores.float()).masked_fill(~valid, -torch.inf)
    k = min(int(budget.max()), ranked.shape[-1])
    values, index = ranked.topk(k, dim=-1)
    within = torch.arange(k, device=ranked.device) < budget.to(ranked.device).view(-1, 1, 1)
    keep = torch.zeros_like(valid)
    return keep.scatter(-1, index, within & (values > -torch.inf))


ALLOCATORS: dict[str, type[Allocator]] = {cls.name: cls for cls in (Uniform,)}
