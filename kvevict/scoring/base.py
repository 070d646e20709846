"""The scorer contract: what each stored entry is worth (higher = keep)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may look at when the cache selects entries in one layer.

    keys ``[B, H, S, D]`` (after RoPE), values ``[B, H, S, Dv]``, positions ``[B, H, S]`` (logical
    token index, ``-1`` for an empty slot), queries ``[B, Hq, q, D]`` of the forward pass that
    triggered the selection (only when the scorer ``needs`` them), ``state`` the per-slot tensors the
    scorer keeps in the layer's storage.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    layer_idx: int
    seen: int
    queries: torch.Tensor | None = None
    state: dict[str, torch.Tensor] | None = None


class Scorer:
    """Base class of scorers. Subclasses set ``name`` and implement :meth:`score`.

    ``needs`` declares what the scorer reads beyond keys/values/positions: ``"queries"`` makes the
    attention pass hand over the current queries. Scores of empty slots are ignored.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return ``[B, H, S]`` float scores; higher means more worth keeping."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
