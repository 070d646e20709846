"""The ``kvevict`` attention implementation, registered with transformers under its own name.

Transformers builds one mask per forward pass through :func:`kvevict_mask`; instead of a dense
``[B, 1, q, kv]`` tensor it returns a :class:`KVMask` that keeps the *rule* (the mask function over
logical positions, and the 2D padding mask). :func:`kvevict_attention` then evaluates that rule on
the logical positions of the entries each KV head really holds, which may differ per row, head and
layer. The evicting cache layer hands itself over in ``update`` (see :func:`hand_over`) and gets
the queries back after attention, which is where policies see what they need.

Without an :class:`~kvevict.cache.EvictionCache` (e.g. a plain ``DynamicCache``, or a vision tower),
the implementation behaves exactly like transformers' ``sdpa``.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .storage import additive_bias

if TYPE_CHECKING:
    from .cache import EvictingLayer
    from .storage import HeadwiseKV

ATTN_IMPLEMENTATION = "kvevict"

UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")  # attention features that change the softmax


def refuse_unsupported(kwargs: dict, who: str) -> None:
    """Raise if the attention call's ``kwargs`` ask for a softmax ``who`` (e.g. "kvevict attention") does
    not compute: logit soft-capping or attention sinks."""
    unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"{who} does not support {unsupported} (logit soft-capping, attention sinks)")

_PENDING: ContextVar["EvictingLayer | None"] = ContextVar("kvevict_pending_layer", default=None)


@dataclass
class KVMask:
    """A deferred attention mask: the rule, not the tensor.

    ``mask_function(batch_idx, head_idx, q_idx, kv_idx) -> bool`` over logical positions (broadcast
    index tensors), ``padding`` ``[B, seen + q]`` bool (``True`` = real token) or ``None``.
    """

    mask_function: Callable
    padding: torch.Tensor | None
    sdpa_kwargs: dict[str, Any] = field(repr=False)
    _standard: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_causal(self) -> bool:
        return self.mask_function is causal_mask_function

    def standard(self) -> torch.Tensor | None:
        """The mask transformers' ``sdpa`` would have used (for attention outside an EvictionCache)."""
        if self._standard is None:
            self._standard = sdpa_mask(**self.sdpa_kwargs)
        return self._standard


def kvevict_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> KVMask:
    """Mask interface: record the rule; see module docstring."""
    sdpa_kwargs = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )
    padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
    return KVMask(mask_function, padding, sdpa_kwargs)


def hand_over(layer: "EvictingLayer") -> None:
    """Called by an evicting layer's ``update``: the next attention call belongs to it."""
    _PENDING.set(layer)


def _take_pending(module: torch.nn.Module, key: torch.Tensor) -> "EvictingLayer | None":
    """The evicting layer whose ``update`` produced ``key``, if any (a stale hand-over is dropped)."""
    layer = _PENDING.get()
    _PENDING.set(None)
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None) or layer.kv.length != key.shape[-2]:
        return None
    return layer


def kvevict_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: KVMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the entries an evicting cache layer holds.

    query ``[B, Hq, q, D]``, key/value ``[B, H, S, D]`` as returned by the layer's ``update``.
    Returns ``([B, q, Hq, Dv], None)`` like transformers' attention functions.
    """
    layer = _take_pending(module, key)
    if layer is None:
        if isinstance(attention_mask, KVMask):
            expected = attention_mask.sdpa_kwargs["kv_length"]
            if key.shape[-2] != expected:
                raise RuntimeError(
                    f"kvevict attention got {key.shape[-2]} keys without an evicting cache layer handing them over "
                    f"(the mask expects {expected}); this layer does not go through EvictionCache.update"
                )
            attention_mask = attention_mask.standard()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    refuse_unsupported(kwargs, "kvevict attention")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "kvevict attention needs the 2D attention mask (got a prepared 4D mask); pass `attention_mask` as "
            "[batch, tokens] or leave it out"
        )
    positions = layer.kv.positions
    plain_causal = attention_mask is None or (attention_mask.is_causal and attention_mask.padding is None)
    if (FLASH_VARLEN is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and plain_causal and layer.sliding_window is None):
        out = attend_varlen(query, key, value, positions, scaling, FLASH_VARLEN)
    elif (plain_causal and layer.kv.has_holes and layer.kv.run_start is not None and query.shape[2] > 1
          and layer.sliding_window is None):
        out = attend_per_head(query, key, value, layer.kv.run_start, scaling)
    else:
        mask, is_causal = build_mask(layer.kv, query.shape[2], layer.seen, attention_mask, layer.sliding_window)
        out = attend(query, key, value, mask, scaling, is_causal)
    layer.after_attention(query, attention_mask, module, module.scaling if scaling is None else scaling)
    return out, None


def build_mask(
    kv: HeadwiseKV,
    q_length: int,
    seen: int,
    info: KVMask | None,
    window: int | None,
) -> tuple[torch.Tensor | None, bool]:
    """Mask of the entries of ``kv`` for queries at logical positions ``seen - q_length .. seen - 1``.

    Returns ``(mask, is_causal)``: ``mask`` is ``None``, head-shared ``[1, 1, q, S]`` (bool, or the
    additive causal tail) or per head ``[B, H, q, S]`` (when decoding: the storage's additive bias,
    ``[B, H, 1, S]``); ``is_causal`` means plain causal attention over contiguous entries.
    """
    positions = kv.positions
    causal = info is None or (info.is_causal and info.padding is None)
    plain = causal and not kv.has_holes
    if causal and window is None:
        if q_length == 1:  # decoding: every stored entry is in the past
            return (kv.bias[:, :, None, :] if kv.has_holes else None), False
        if plain:  # every head's past entries, then the queries' own in the last q slots
            s = positions.shape[-1]
            if s == q_length:
                return None, True
            return causal_tail(q_length, s, kv.keys.dtype, positions.device)[None, None], False
    q_pos = torch.arange(seen - q_length, seen, device=positions.device)
    if plain and _same_everywhere(positions):  # a sliding window over entries shared by all heads
        row = positions[0, 0]
        mask = (row[None, :] <= q_pos[:, None]) & (row[None, :] > q_pos[:, None] - window)
        return mask[None, None], False
    kv = positions[:, :, None, :]  # [B, H, 1, S]
    kv_idx = kv.clamp(min=0)
    b_idx = torch.arange(positions.shape[0], device=positions.device).view(-1, 1, 1, 1)
    q_idx = q_pos.view(1, 1, -1, 1)
    rule = causal_mask_function if info is None else info.mask_function
    mask = torch.as_tensor(rule(b_idx, 0, q_idx, kv_idx), device=positions.device) & (kv >= 0)
    if info is not None and info.padding is not None:
        padding = info.padding.to(positions.device)
        if padding.shape[-1] < seen:
            raise ValueError(
                f"attention_mask covers {padding.shape[-1]} tokens but the cache has seen {seen}; pass the mask "
                "of the whole conversation"
            )
        mask &= padding[b_idx, kv_idx]
    if window is not None and info is None:  # transformers' sliding rules carry the window themselves
        mask &= kv > q_idx - window
    if causal:  # every query sees at least its own entry
        return mask, False
    # A query that may see nothing (a pad) attends to everything instead of producing NaNs.
    return mask | ~mask.any(-1, keepdim=True), False


def causal_tail(q: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[q, s]`` mask for ``q`` queries whose own entries are the last ``q`` of ``s`` slots:
    every earlier slot is visible, the last ``q`` causally. Its right-aligned slices ``[:, j:]`` are
    the masks of the shorter runs ``j .. s - 1``."""
    mask = torch.zeros(q, s, dtype=dtype, device=device)
    mask[:, s - q:].fill_(-torch.inf).triu_(1)
    return mask


def _same_everywhere(positions: torch.Tensor) -> bool:
    b, h = positions.shape[:2]
    return b * h == 1 or bool((positions == positions[:1, :1]).all())


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA with grouped-query heads. query ``[B, Hq, q, D]``, key/value ``[B, H, S, ·]``,
    mask ``None``/``[1|B, 1, q, S]``/``[B, H, q, S]`` (bool, or additive in the queries' dtype).
    Returns ``[B, q, Hq, Dv]``."""
    b, hq, q, d = query.shape
    h = key.shape[1]
    groups = hq // h
    if q > 1 and mask is not None and mask.dtype == torch.bool:
        mask = additive_bias(mask, query.dtype)  # CPU SDPA runs faster on an additive mask
    if q > 1 and (mask is None or mask.shape[1] == 1):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2).contiguous()
    # Fold each group's query heads into the query axis of its KV head (per-head masks; and for a
    # single query, faster on CPU than SDPA's own grouped-query path).
    grouped = query.reshape(b, h, groups * q, d)
    if mask is not None and q > 1:
        mask = mask[:, :, None].expand(-1, mask.shape[1], groups, -1, -1).reshape(b, -1, groups * q, mask.shape[-1])
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.view(b, hq, q, -1).transpose(1, 2).contiguous()


def attend_per_head(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    run_start: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention of each (row, KV head)'s query group over that head's own entries only.

    For a prefill chunk over a layer whose heads hold different numbers of entries, each one run of
    slots ``run_start .. S - 1`` ending with the chunk's own ``q`` entries: one SDPA call per (row, head)
    over a view of its run needs no per-head mask and attends over no empty slot, which on CPU costs
    less than one call over the padded layout. No padding. query ``[B, Hq, q, D]``, key/value
    ``[B, H, S, ·]``, run_start ``[B, H]``. Returns ``[B, q, Hq, Dv]``.
    """
    b, hq, q, d = query.shape
    h, s = key.shape[1], key.shape[2]
    grouped = query.view(b, h, hq // h, q, d)
    visible = causal_tail(q, s, query.dtype, query.device)[None, None]
    out = query.new_empty(b, h, hq // h, q, value.shape[-1])
    for row, starts in enumerate(run_start.tolist()):
        for head, start in enumerate(starts):
            out[row, head] = F.scaled_dot_product_attention(  # 4D operands: CPU kernels are slower on 3D ones
                grouped[row, head][None], key[row, head, start:][None, None], value[row, head, start:][None, None],
                attn_mask=visible[..., start:], scale=scaling, enable_gqa=True,
            )[0]
    return out.view(b, hq, q, -1).transpose(1, 2).contiguous()


def attend_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    scaling: float | None,
    kernel: Callable,
) -> torch.Tensor:
    """Variable-length attention (flash-attn's ``flash_attn_varlen_func`` contract): every (row, KV head)
    is its own sequence of its stored entries, attended by that head's query group.

    Valid only for plain causal attention without padding in this forward pass: the last ``q`` entries
    of each sequence are the queries' own tokens, so bottom-right causal alignment is exact.
    query ``[B, Hq, q, D]``, key/value ``[B, H, S, ·]``, positions ``[B, H, S]``. Returns ``[B, q, Hq, Dv]``.
    """
    b, hq, q, d = query.shape
    h = key.shape[1]
    valid = positions >= 0
    counts = valid.sum(-1).flatten().to(torch.int32)  # [B * H]
    zero = torch.zeros(1, dtype=torch.int32, device=query.device)
    cu_k = torch.cat([zero, counts.cumsum(0, dtype=torch.int32)])
    cu_q = torch.arange(b * h + 1, dtype=torch.int32, device=query.device) * q
    packed_q = query.view(b, h, hq // h, q, d).permute(0, 1, 3, 2, 4).reshape(b * h * q, hq // h, d)
    packed_k = key[valid][:, None]  # [sum of counts, 1, D], in (row, head, slot) order
    packed_v = value[valid][:, None]
    out = kernel(packed_q, packed_k, packed_v, cu_q, cu_k, q, int(counts.max()), softmax_scale=scaling, causal=True)
    return out.view(b, h, q, hq // h, -1).permute(0, 2, 1, 3, 4).reshape(b, q, hq, -1)


def _flash_varlen() -> Callable | None:
    """flash-attn's varlen kernel when it is installed and CUDA is available."""
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


FLASH_VARLEN = _flash_varlen()


def register() -> None:
    """Register the ``kvevict`` attention and mask implementations (idempotent; built-ins untouched)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvevict_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvevict_mask)
