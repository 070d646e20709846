"""The attention paths agree: SDPA over masked per-head entries, and the packed varlen layout that
feeds flash-attn on GPUs (checked here against a plain-torch kernel with flash-attn's contract)."""

from __future__ import annotations

import torch

from kvevict import EvictionCache, with_cache
from kvevict.attention import attend, attend_per_head, attend_varlen, build_mask
from conftest import prompt


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
    """flash_attn_varlen_func semantics in plain torch: causal masks align to the bottom-right."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1], 0], v[cu_k[i]:cu_k[i + 1], 0]
        logits = torch.einsum("qgd,kd->gqk", qi, ki) * softmax_scale
        lq, lk = qi.shape[0], ki.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        probs = logits.masked_fill(~allowed, -torch.inf).softmax(-1)
        out.append(torch.einsum("gqk,kd->qgd", probs, vi))
    return torch.cat(out)


def test_varlen_packing_matches_masked_sdpa(llama):
    # head-wise budgets leave heads with different numbers of entries (holes in the padded layout)
    cache = EvictionCache(llama, "adakv:snapkv", budget=10, sinks=2, recent=4, slack=0)
    llama(prompt(50), **with_cache(llama, cache))
    layer = cache.layers[1]
    assert layer.kv.has_holes
    g = torch.Generator().manual_seed(0)
    for q in (1, 5):  # a decoding step and a prefill chunk
        b, h, _, d = layer.kv.keys.shape
        new_k, new_v = torch.randn(b, h, q, d, generator=g, dtype=torch.float64), torch.randn(b, h, q, d, generator=g, dtype=torch.float64)
        keys, values = layer.update(new_k, new_v)
        query = torch.randn(b, 2 * h, q, d, generator=g, dtype=torch.float64)
        mask, is_causal = build_mask(layer.kv, q, layer.seen, None, None)
        expected = attend(query, keys, values, mask, 0.25, is_causal)
        got = attend_varlen(query, keys, values, layer.kv.positions, 0.25, reference_varlen)
        assert torch.allclose(got, expected, atol=1e-10)
        if q > 1:  # the CPU path for prefill chunks: one call per (row, head) over its own entries
            got = attend_per_head(query, keys, values, layer.kv.run_start, 0.25)
            assert torch.allclose(got, expected, atol=1e-10)


def test_prefill_chunk_fast_paths_match_the_general_mask(llama):
    # Uniform SnapKV: heads hold as many entries as each other, but different ones. A pad at a position
    # no head holds any more changes nothing, yet sends the next chunk through the general mask path.
    for policy in ("snapkv", "adakv:snapkv"):  # no holes (one shared causal-tail mask); holes (per head)
        cache, twin = (EvictionCache(llama, policy, budget=10, sinks=2, recent=4, slack=0) for _ in range(2))
        ids = prompt(56)
        for c in (cache, twin):
            llama(ids[:, :40], **with_cache(llama, c))
        held = torch.cat([layer.kv.positions.flatten() for layer in cache.layers])
        assert cache.layers[0].kv.has_holes == (policy != "snapkv")
        gone = next(p for p in range(40) if p not in held.tolist())
        fast = llama(ids[:, 40:], **with_cache(llama, cache)).logits
        mask = torch.ones_like(ids)
        mask[0, gone] = 0
        general = llama(ids[:, 40:], attention_mask=mask, **with_cache(llama, twin)).logits
        assert torch.allclose(fast, general, atol=1e-5)
