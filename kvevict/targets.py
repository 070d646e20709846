"""Regression targets for retention gates, from one forward pass (no backward, no LM head).

Two targets, per full-attention layer, KV head ``h`` and entry ``i`` (``a^g_ti``: query head ``g``'s
attention from token ``t`` to entry ``i``; ``W_o^g`` its slice of the output projection; ``x_t`` the
layer's attention input; a KV head takes the max over its query heads):

- ``kvzip`` (KVzip+, what KVzap regresses; research.md §4): one pass over ``context + "Repeat the
  previous context exactly." + context`` (in the model's chat frame);
  ``y_hi = log max_{t in repeat} a^g_ti ||W_o^g v_i|| / ||x_t||``, the largest share of a repeated
  token's update that entry ``i`` writes. Repeating reads every entry back: no question needed.
- ``reuse``: one pass over the window itself; entry ``i`` is *read* by a later token ``t`` when its
  contribution ``a^g_ti ||W_o^g v_i||`` is among the top ``REUSE_KEEP`` of the entries ``t`` sees;
  ``y_hi = log(T r_hi)``, ``r_hi`` the share of the later tokens of the ``T``-token window that read
  it. The gates' score ``-(age) exp(-y)`` then ranks entries by ``log r - log(age / T)``: how often
  later text reads an entry, discounted by its age. Only entries of the first half of the window are
  returned, so every share is measured over at least half the window.

The pass runs in chunks through a plain ``DynamicCache``, so it needs memory for one chunk's
attention, not the whole sequence's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import refuse_unsupported
from .compat import attention_input, attention_modules, decoder, with_cache
from .evaluate import chat_frame, encode
from .scoring.criticalkv import output_norms

TARGETS = ("kvzip", "reuse")
TARGET_ATTENTION = "kvevict_targets"
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
ATTENTION_FLOOR = 1e-30  # attention that underflowed to 0 counts as this (a finite log)
REUSE_KEEP = 0.1  # an entry is read by a token when it is in the top 10% of what the token reads

Record = Callable[..., None]  # (module, layer, x [q, D], query [Hq, q, d], key, value [H, n, d], scaling)


def repeat_frame(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The token ids before the context (start of a user turn) and between the context and its
    repetition (the instruction, end of turn, start of the answer)."""
    head, tail = chat_frame(tok)
    return encode(tok, head), encode(tok, REPEAT_INSTRUCTION + tail)


def repeat_prompt(context: list[int], frame: tuple[list[int], list[int]]) -> tuple[torch.Tensor, slice, slice]:
    """Token ids ``[1, n]`` of ``frame[0] + context + frame[1] + context``, with the slices of the
    context and of its repetition."""
    first, middle = frame
    ids = first + context + middle + context
    start, again = len(first), len(first) + len(context) + len(middle)
    return torch.tensor([ids]), slice(start, start + len(context)), slice(again, again + len(context))


@torch.no_grad()
def kvzip_targets(model: PreTrainedModel, context: list[int], frame: tuple[list[int], list[int]],
                  layers: tuple[int, ...], kv_heads: int, chunk: int = 1024) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each full-attention layer in ``layers``: the attention inputs of the context's entries
    ``[T, D]`` (float32) and their KVzip+ targets ``[kv_heads, T]`` (float32). ``frame``:
    :func:`repeat_frame`'s token ids."""
    ids, ctx, rep = repeat_prompt(context, frame)
    features: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    best: dict[int, torch.Tensor] = {}  # layer -> [Hq, T] running max over the repeated tokens
    norms: dict[int, torch.Tensor] = {}  # layer -> ||W_o^g v_i|| of the context [Hq, T]

    def record(module, layer, x, query, key, value, scaling) -> None:
        n, q = key.shape[-2], query.shape[-2]
        first = n - q
        lo, hi = max(ctx.start, first), min(ctx.stop, n)
        if lo < hi:
            features[layer].append(x[lo - first : hi - first].float())
        lo, hi = max(rep.start, first), min(rep.stop, n)
        if lo >= hi:
            return
        if layer not in norms:
            norms[layer] = _value_norms(module, value[:, ctx])
        probs = _attention(query[:, lo - first : hi - first], key, lo, scaling)  # [Hq, r, n]
        share = probs[..., ctx] / x[lo - first : hi - first].float().norm(dim=-1)[None, :, None]
        chunk_best = share.amax(1) * norms[layer]
        best[layer] = chunk_best if layer not in best else torch.maximum(best[layer], chunk_best)

    _run(model, ids, layers, record, chunk)
    return {layer: (torch.cat(features[layer]).cpu(), _per_kv_head(best[layer], kv_heads).clamp(min=ATTENTION_FLOOR).log().cpu())
            for layer in layers}


@torch.no_grad()
def reuse_targets(model: PreTrainedModel, window: list[int], layers: tuple[int, ...], kv_heads: int,
                  chunk: int = 1024) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each full-attention layer in ``layers``: the attention inputs ``[T // 2, D]`` of the first
    half of ``window``'s entries and their reuse targets ``[kv_heads, T // 2]`` (float32)."""
    ids = torch.tensor([window])
    observed = len(window) // 2
    features: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    reads: dict[int, torch.Tensor] = {}  # layer -> [Hq, observed] later tokens that read each entry
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}  # ||W_o^g v_i||, chunk by chunk

    def record(module, layer, x, query, key, value, scaling) -> None:
        n, q = key.shape[-2], query.shape[-2]
        first = n - q
        if first < observed:
            features[layer].append(x[: observed - first].float())
        norms[layer].append(_value_norms(module, value[:, first:]))
        contribution = _attention(query, key, first, scaling) * torch.cat(norms[layer], -1)[:, None, :]  # [Hq, q, n]
        seen = torch.arange(first + 1, n + 1, device=key.device)  # entries each query sees
        rank = (REUSE_KEEP * seen).ceil().long() - 1  # [q]
        ordered = contribution.sort(-1, descending=True).values
        threshold = ordered.gather(-1, rank[None, :, None].expand(contribution.shape[0], -1, 1))  # [Hq, q, 1]
        contribution = contribution[..., :observed]
        age = seen[:, None] - torch.arange(contribution.shape[-1], device=key.device)[None, :]  # [q, <= observed]: t + 1 - i
        read = (contribution >= threshold) & (contribution > 0) & (age > 1)
        hits = torch.nn.functional.pad(read.sum(1).float(), (0, observed - read.shape[-1]))  # [Hq, observed]
        reads[layer] = hits if layer not in reads else reads[layer] + hits

    _run(model, ids, layers, record, chunk)
    later = len(window) - torch.arange(1, observed + 1).float()  # tokens after each entry
    return {layer: (torch.cat(features[layer]).cpu(),
                    (_per_kv_head(reads[layer].cpu(), kv_heads) / later * len(window)).clamp(min=1).log())
            for layer in layers}


def _run(model: PreTrainedModel, ids: torch.Tensor, layers: tuple[int, ...], record: Record, chunk: int) -> None:
    """A chunked pass of the decoder over ``ids`` ``[1, n]`` under ``sdpa`` attention; every
    full-attention layer in ``layers`` hands each chunk to ``record``."""
    inputs: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs) -> None:
        inputs[module.layer_idx] = attention_input(args, kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        refuse_unsupported(kwargs, "the regression targets' attention")
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer in inputs:
            record(module, layer, inputs.pop(layer)[0], query[0], key[0], value[0],
                   kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return out

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)
               if m.layer_idx in layers]
    language_model = decoder(model)
    previous = model.config._attn_implementation
    AttentionInterface.register(TARGET_ATTENTION, attention)
    AttentionMaskInterface.register(TARGET_ATTENTION, sdpa_mask)
    model.set_attn_implementation(TARGET_ATTENTION)
    try:
        cache = DynamicCache(config=model.config)
        for part in ids.to(model.device).split(chunk, dim=-1):
            language_model(input_ids=part, use_cache=True, **with_cache(language_model, cache))
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)


def _attention(query: torch.Tensor, key: torch.Tensor, first: int, scaling: float) -> torch.Tensor:
    """Causal attention probabilities ``[Hq, q, n]`` (float32) of queries ``[Hq, q, d]`` at absolute
    positions ``first ..`` over keys ``[H, n, d]`` at ``0 .. n - 1``."""
    groups = query.shape[0] // key.shape[0]
    logits = torch.einsum("gqd,gnd->gqn", query.float(), key.float().repeat_interleave(groups, 0)) * scaling
    n = key.shape[-2]
    later = torch.arange(n, device=key.device)[None, :] > torch.arange(first, first + query.shape[1], device=key.device)[:, None]
    return logits.masked_fill(later, -torch.inf).softmax(-1)


def _value_norms(module: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
    """``||W_o^g v_i||`` ``[Hq, n]`` for values ``[H, n, d]`` (query head ``g`` reads KV head ``g // (Hq / H)``)."""
    return output_norms(module.o_proj.weight, value[None])[0].flatten(0, 1)


def _per_kv_head(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[Hq, T]`` -> ``[kv_heads, T]``: the max over each KV head's query heads."""
    return per_query_head.view(kv_heads, -1, per_query_head.shape[-1]).amax(1)
