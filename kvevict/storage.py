"""Physical KV storage for one layer: per-(row, KV head) variable numbers of entries.

Entries live in dense tensors padded to the longest (row, head) of the layer; every slot carries the
logical position of the token it came from (``-1`` marks an empty slot). Compaction allocates new
tensors of the kept length, so evicted entries really release their memory.
"""

from __future__ import annotations

import torch


class HeadwiseKV:
    """Keys, values and positions of one layer.

    Shapes: ``keys`` ``[B, H, S, D]``, ``values`` ``[B, H, S, Dv]``, ``positions`` ``[B, H, S]`` (int64).
    Slots are kept in chronological order along ``S``; ``extra`` holds per-slot tensors
    ``[B, H, S, ...]`` owned by a scorer (e.g. accumulated attention), gathered with the entries.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions
        self.extra: dict[str, torch.Tensor] = {}
        self.has_holes = False

    @classmethod
    def empty(cls, like_keys: torch.Tensor, like_values: torch.Tensor) -> "HeadwiseKV":
        b, h, _, d = like_keys.shape
        dv = like_values.shape[-1]
        kw = dict(dtype=like_keys.dtype, device=like_keys.device)
        pos = torch.empty(b, h, 0, dtype=torch.long, device=like_keys.device)
        return cls(torch.empty(b, h, 0, d, **kw), torch.empty(b, h, 0, dv, **kw), pos)

    @property
    def length(self) -> int:
        """Stored slots per (row, head), holes included."""
        return self.keys.shape[-2]

    def valid(self) -> torch.Tensor:
        """``[B, H, S]`` bool: slots holding an entry."""
        return self.positions >= 0

    def counts(self) -> torch.Tensor:
        """``[B, H]`` int64: entries held per (row, head)."""
        return self.valid().sum(-1)

    def nbytes(self) -> int:
        """Bytes held by the entries' tensors (keys, values, positions and scorer state)."""
        tensors = [self.keys, self.values, self.positions, *self.extra.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append ``q`` new slots (``[B, H, q, ·]``, positions ``[B, H, q]``); scorer state gets zeros."""
        q = keys.shape[-2]
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        self.positions = torch.cat([self.positions, positions], dim=-1)
        for name, t in self.extra.items():
            pad = t.new_zeros(*t.shape[:2], q, *t.shape[3:])
            self.extra[name] = torch.cat([t, pad], dim=2)

    def compact(self, keep: torch.Tensor) -> int:
        """Keep the slots where ``keep`` (``[B, H, S]`` bool) is set, in their order; return entries dropped.

        The result has length ``max(keep.sum(-1))``; shorter (row, head)s get empty slots at the end.
        """
        keep = keep & self.valid()
        counts = keep.sum(-1)
        new_len = int(counts.max()) if counts.numel() else 0
        dropped = int(self.valid().sum() - counts.sum())
        # Stable sort of "not kept" puts the kept slots first, in chronological order.
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :new_len]
        kept = torch.gather(keep, -1, order)
        self.positions = torch.where(kept, torch.gather(self.positions, -1, order), -1)
        self.keys = _gather_slots(self.keys, order)
        self.values = _gather_slots(self.values, order)
        self.extra = {name: _gather_slots(t, order) for name, t in self.extra.items()}
        self.has_holes = bool((counts != new_len).any())
        return dropped

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder / repeat / select the batch rows by ``index`` (``[B']``)."""
        self.keys = self.keys.index_select(0, index.to(self.keys.device))
        self.values = self.values.index_select(0, index.to(self.keys.device))
        self.positions = self.positions.index_select(0, index.to(self.keys.device))
        self.extra = {k: t.index_select(0, index.to(t.device)) for k, t in self.extra.items()}


def _gather_slots(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather along the slot axis (2) of ``t`` ``[B, H, S, ...]`` with ``order`` ``[B, H, S']``."""
    idx = order.view(*order.shape, *([1] * (t.dim() - 3))).expand(*order.shape, *t.shape[3:])
    return torch.gather(t, 2, idx)
