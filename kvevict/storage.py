"""Physical KV storage for one layer: per-(row, KV head) variable numbers of entries.

Entries live in dense tensors padded to the longest (row, head) of the layer; every slot carries the
logical position of the token it came from (``-1`` marks an empty slot) and an additive attention
bias (``0``, or ``-inf`` for an empty slot). The tensors are buffers with room to grow: appending
writes in place and reallocates only when the room is used up (then with ``reserve`` spare slots, so
decoding does not copy the cache at every step). Compaction allocates buffers of exactly the kept
length, so evicted entries really release their memory, and packs each (row, head)'s entries at the
end: a shorter one gets its empty slots first, so its entries stay one run of slots that later appends
extend (attention can then read each head's entries as a view).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch


class SlotState(MutableMapping):
    """Per-slot scorer state (``name -> [B, H, S, ...]``) stored beside the entries and moved with them.

    Reading gives a view of the used slots (update it in place, or assign a full-length tensor); the
    slots of new entries start at zero.
    """

    def __init__(self, kv: "HeadwiseKV") -> None:
        self._kv = kv
        self.buffers: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name][:, :, : self._kv.length]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        buffer = self.buffers.get(name)
        if buffer is not None and value.data_ptr() == buffer.data_ptr() and value.shape[2] == self._kv.length:
            return  # an in-place update of the view (``state[name] += x``)
        want = tuple(self._kv.positions.shape)
        if tuple(value.shape[:3]) != want:
            raise ValueError(f"slot state {name!r} must be [B, H, S, ...] = {want}, got {tuple(value.shape)}")
        buffer = value.new_zeros(*want[:2], self._kv.capacity, *value.shape[3:])
        buffer[:, :, : want[2]] = value
        self.buffers[name] = buffer

    def __delitem__(self, name: str) -> None:
        del self.buffers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.buffers)

    def __len__(self) -> int:
        return len(self.buffers)


class HeadwiseKV:
    """Keys, values, positions and attention bias of one layer.

    Views of the used slots: ``keys`` ``[B, H, S, D]``, ``values`` ``[B, H, S, Dv]``, ``positions``
    ``[B, H, S]`` (int64), ``bias`` ``[B, H, S]`` (keys' dtype). Slots are kept in chronological order
    along ``S``; ``run_start`` (``[B, H]`` int64, or ``None`` once pads left holes between entries) is
    the first slot of each (row, head)'s run of entries, which ends at ``length``; ``extra`` (a
    :class:`SlotState`) holds per-slot tensors owned by a scorer (e.g. accumulated attention),
    gathered with the entries.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, reserve: int = 0) -> None:
        self.buffers = {"keys": keys, "values": values, "positions": positions,
                        "bias": _bias(positions, keys.dtype)}
        self.length = positions.shape[-1]  # used slots per (row, head), holes included
        self.reserve = reserve
        self.extra = SlotState(self)
        self.has_holes = False
        self.run_start: torch.Tensor | None = torch.zeros(positions.shape[:2], dtype=torch.long,
                                                          device=positions.device)

    @classmethod
    def empty(cls, like_keys: torch.Tensor, like_values: torch.Tensor, reserve: int = 0) -> "HeadwiseKV":
        b, h, _, d = like_keys.shape
        dv = like_values.shape[-1]
        kw = dict(dtype=like_keys.dtype, device=like_keys.device)
        pos = torch.empty(b, h, 0, dtype=torch.long, device=like_keys.device)
        return cls(torch.empty(b, h, 0, d, **kw), torch.empty(b, h, 0, dv, **kw), pos, reserve)

    # --- views of the used slots ------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self.buffers["keys"][:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.buffers["values"][:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self.buffers["positions"][:, :, : self.length]

    @property
    def bias(self) -> torch.Tensor:
        """``[B, H, S]`` additive attention bias: ``0`` for an entry, ``-inf`` for an empty slot."""
        return self.buffers["bias"][:, :, : self.length]

    @property
    def capacity(self) -> int:
        """Allocated slots per (row, head)."""
        return self.buffers["positions"].shape[-1]

    def valid(self) -> torch.Tensor:
        """``[B, H, S]`` bool: slots holding an entry."""
        return self.positions >= 0

    def counts(self) -> torch.Tensor:
        """``[B, H]`` int64: entries held per (row, head)."""
        return self.valid().sum(-1)

    def nbytes(self) -> int:
        """Bytes allocated for the entries (keys, values, positions, bias and scorer state), spare room included."""
        return sum(t.numel() * t.element_size() for t in self._all().values())

    # --- changes ----------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append ``q`` new slots (``[B, H, q, ·]``, positions ``[B, H, q]``); scorer state gets zeros."""
        end = self.length + keys.shape[-2]
        frozen = not torch.is_inference_mode_enabled() and any(t.is_inference() for t in self._all().values())
        if end > self.capacity or frozen:  # buffers made under inference_mode cannot be written outside it
            self._resize(end + self.reserve)
        new = slice(self.length, end)
        self.buffers["keys"][:, :, new] = keys
        self.buffers["values"][:, :, new] = values
        self.buffers["positions"][:, :, new] = positions
        self.buffers["bias"][:, :, new] = 0
        for t in self.extra.buffers.values():
            t[:, :, new] = 0
        self.length = end

    def clear(self, empty: torch.Tensor) -> None:
        """Mark the last ``q`` slots empty where ``empty`` (``[B, H, q]`` bool) is set (e.g. pads)."""
        last = slice(self.length - empty.shape[-1], self.length)
        self.buffers["positions"][:, :, last].masked_fill_(empty, -1)
        self.buffers["bias"][:, :, last].masked_fill_(empty, -torch.inf)
        if bool(empty.any()):
            self.has_holes, self.run_start = True, None

    def compact(self, keep: torch.Tensor) -> int:
        """Keep the slots where ``keep`` (``[B, H, S]`` bool) is set, in their order; return entries dropped.

        The result has length ``max(keep.sum(-1))``; shorter (row, head)s get empty slots at the start.
        """
        valid = self.valid()
        keep = keep & valid
        counts = keep.sum(-1)
        new_len = int(counts.max()) if counts.numel() else 0
        dropped = int(valid.sum() - counts.sum())
        # A stable sort on "kept" puts the kept slots last, in chronological order.
        order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[..., keep.shape[-1] - new_len:]
        kept = torch.gather(keep, -1, order)
        used = self._used()
        gathered = {name: _gather_slots(t, order) for name, t in used.items()}
        gathered["positions"] = torch.where(kept, gathered["positions"], -1)
        gathered["bias"] = _bias(gathered["positions"], gathered["keys"].dtype)
        self._set(gathered, new_len)
        self.has_holes = bool((counts != new_len).any())
        self.run_start = new_len - counts
        return dropped

    def forget_from(self, position: int) -> int:
        """Drop the entries of logical ``position`` and later; return how many. In place (the spare room
        stays) when they are every (row, head)'s last slots, as after appends; else by compaction."""
        later = self.positions >= position
        n = int(later.sum(-1).max()) if later.numel() else 0
        last = self.length - n
        if bool(later[..., last:].all()) and not bool(later[..., :last].any()):
            self.length = last
            return int(later.sum())
        return self.compact(~later)

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder / repeat / select the batch rows by ``index`` (``[B']``)."""
        index = index.to(self.buffers["keys"].device)
        self._set({name: t.index_select(0, index) for name, t in self._used().items()}, self.length)
        if self.run_start is not None:
            self.run_start = self.run_start.index_select(0, index)

    # --- buffers ----------------------------------------------------------------------------------
    def _all(self) -> dict[str, torch.Tensor]:
        return {**self.buffers, **{f"extra.{k}": t for k, t in self.extra.buffers.items()}}

    def _used(self) -> dict[str, torch.Tensor]:
        return {name: t[:, :, : self.length] for name, t in self._all().items()}

    def _set(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        """Install full buffers ``name -> [B, H, capacity, ...]`` holding ``length`` used slots."""
        self.buffers = {k: tensors[k] for k in ("keys", "values", "positions", "bias")}
        self.extra.buffers = {k[len("extra."):]: t for k, t in tensors.items() if k.startswith("extra.")}
        self.length = length

    def _resize(self, capacity: int) -> None:
        """Move the used slots into new buffers of ``capacity`` slots."""
        grown = {}
        for name, t in self._used().items():
            grown[name] = t.new_empty(*t.shape[:2], capacity, *t.shape[3:])
            grown[name][:, :, : self.length] = t
        self._set(grown, self.length)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (``True``: attend) as an additive attention bias of ``dtype``: ``0``, or ``-inf``."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -torch.inf)


def _bias(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return additive_bias(positions >= 0, dtype)


def _gather_slots(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather along the slot axis (2) of ``t`` ``[B, H, S, ...]`` with ``order`` ``[B, H, S']``."""
    idx = order.view(*order.shape, *([1] * (t.dim() - 3))).expand(*order.shape, *t.shape[3:])
    return torch.gather(t, 2, idx)
