"""Which cached entries are image tokens: a per-row map over logical positions.

The map is filled from the model inputs before ``generate`` (``EvictionCache.prepare``): the
positions whose token id is the model config's image token. Positions past the map are text.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def image_token_id(config: PretrainedConfig) -> int:
    """The image placeholder token id of a vision-language model's config."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"{type(config).__name__} names no image token (image_token_id / image_token_index): "
        "not a vision-language model kvevict knows how to tag"
    )


class ModalityMap:
    """``image`` ``[B, n]`` bool over logical positions ``0 .. n-1`` (``None``: all text)."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None

    def set(self, image: torch.Tensor) -> None:
        self.image = image.bool()

    def lookup(self, positions: torch.Tensor) -> torch.Tensor | None:
        """``[B, H, S]`` bool for slot positions ``[B, H, S]`` (empty slots are text)."""
        if self.image is None:
            return None
        self.fit_rows(positions.shape[0])
        image = self.image.to(positions.device)
        n = image.shape[1]
        inside = (positions >= 0) & (positions < n)
        rows = torch.arange(positions.shape[0], device=positions.device).view(-1, 1, 1)
        return inside & image[rows, positions.clamp(0, n - 1)]

    def fit_rows(self, rows: int) -> None:
        """Repeat a map of ``B`` rows for a cache of ``rows = k B`` (``generate`` expanded the batch for
        beams or several sequences per prompt before the prefill)."""
        if self.image is None or self.image.shape[0] == rows:
            return
        if rows % self.image.shape[0]:
            raise ValueError(f"the modality map has {self.image.shape[0]} rows but the cache holds {rows}")
        self.image = self.image.repeat_interleave(rows // self.image.shape[0], dim=0)

    def select_rows(self, index: torch.Tensor, rows: int) -> None:
        """Keep the rows ``index`` of a cache holding ``rows`` rows (the map first fitted to them)."""
        if self.image is not None:
            self.fit_rows(rows)
            self.image = self.image.index_select(0, index.to(self.image.device))
