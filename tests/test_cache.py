"""EvictionCache behaviour on tiny random models: equivalence, budgets, positions, batches, beams."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvevict import EvictionCache, with_cache
from kvevict.policy import resolve_policy
from conftest import left_padded, prompt, tiny_gemma3, tiny_llama

GREEDY = dict(do_sample=False, max_new_tokens=24)


def generate(model, ids, cache, **kw):
    mask = kw.pop("attention_mask", torch.ones_like(ids))
    return model.generate(ids, attention_mask=mask, **with_cache(model, cache), **{**GREEDY, **kw})


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_large_budget_matches_dynamic_cache(factory):
    model = factory()
    ids = prompt(40)
    reference = generate(model, ids, DynamicCache(config=model.config))
    cache = EvictionCache(model, "streaming", budget=512)
    assert torch.equal(generate(model, ids, cache), reference)
    assert cache.stats()["evicted"] == 0  # what the sliding layers' windows let go is not evicted, but trimmed
    assert (cache.stats()["trimmed"] > 0) == (factory is tiny_gemma3)
    assert cache.get_seq_length() == 40 + 24 - 1


def test_eviction_changes_output_and_bounds_every_step(llama):
    budget, slack = 16, 4
    cache = EvictionCache(llama, "streaming", budget=budget, sinks=2, recent=6, slack=slack)
    ids = prompt(50)
    out = llama(ids, **with_cache(llama, cache))
    for _ in range(30):
        stored = [layer.kv.counts() for layer in cache.layers]
        assert all(int(c.max()) <= budget + slack for c in stored)
        nxt = out.logits[:, -1:].argmax(-1)
        out = llama(nxt, **with_cache(llama, cache))
    assert cache.get_seq_length() == 80
    assert cache.stats()["evicted"] > 0


def test_bytes_held_follow_entries(llama):
    cache = EvictionCache(llama, "streaming", budget=20, sinks=2, recent=4, slack=0)
    llama(prompt(100), **with_cache(llama, cache))
    stats = cache.stats()
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_entry = 2 * head_dim * 8 + 8 + 8  # float64 key + value, int64 position, float64 attention bias
    assert stats["entries_total"] == cfg.num_hidden_layers * cfg.num_key_value_heads * 20
    assert stats["bytes"] == stats["entries_total"] * per_entry
    # the tensors themselves are that small: memory is really released
    assert all(layer.kv.keys.shape[-2] == 20 for layer in cache.layers)


def test_streaming_keeps_sinks_and_recent(llama):
    cache = EvictionCache(llama, "streaming", budget=10, sinks=3, recent=4, slack=0)
    llama(prompt(30), **with_cache(llama, cache))
    for layer in cache.layers:
        assert layer.kv.positions[0, 0].tolist() == [0, 1, 2] + list(range(23, 30))


def test_hand_loop_equals_generate_under_eviction(llama):
    ids = prompt(60)
    kw = dict(budget=16, sinks=2, recent=4, slack=3)
    gen = generate(llama, ids, EvictionCache(llama, "streaming", **kw))
    cache = EvictionCache(llama, "streaming", **kw)
    logits = llama(ids, **with_cache(llama, cache)).logits
    tokens = [ids]
    for _ in range(GREEDY["max_new_tokens"]):
        tokens.append(logits[:, -1:].argmax(-1))
        logits = llama(tokens[-1], **with_cache(llama, cache)).logits  # positions from cache.get_seq_length()
    assert torch.equal(torch.cat(tokens, -1), gen)


def test_chunked_prefill_bounds_memory_and_matches_generate(llama):
    ids = prompt(90)
    kw = dict(budget=16, sinks=2, recent=4, slack=2)
    gen = generate(llama, ids, EvictionCache(llama, "streaming", **kw), prefill_chunk_size=10)
    cache = EvictionCache(llama, "streaming", **kw)
    for chunk in ids.split(10, dim=-1):
        logits = llama(chunk, **with_cache(llama, cache)).logits
        assert all(layer.kv.length <= 16 + 2 for layer in cache.layers)
    tokens = [ids, logits[:, -1:].argmax(-1)]
    for _ in range(GREEDY["max_new_tokens"] - 1):
        tokens.append(llama(tokens[-1], **with_cache(llama, cache)).logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat(tokens, -1), gen)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "global-zscore:knorm"])
def test_inference_mode_prefill_then_generate(llama, policy):
    """A context compressed under ``torch.inference_mode`` keeps working in ``generate`` (``no_grad``)."""
    ids = prompt(60)
    kw = dict(budget=16, sinks=2, recent=4, slack=3)
    reference = generate(llama, ids, EvictionCache(llama, policy, **kw), prefill_chunk_size=20)
    cache = EvictionCache(llama, policy, **kw)
    with torch.inference_mode():
        for chunk in ids[:, :40].split(20, dim=-1):
            llama(chunk, **with_cache(llama, cache))
    assert torch.equal(generate(llama, ids, cache), reference)


def test_multi_turn_feeds_only_new_tokens(llama):
    kw = dict(budget=24, sinks=2, recent=6, slack=4)
    turn1 = prompt(40)
    cache = EvictionCache(llama, "streaming", **kw)
    out1 = generate(llama, turn1, cache)
    assert cache.get_seq_length() == out1.shape[1] - 1
    turn2 = torch.cat([out1, prompt(15, seed=2)], dim=-1)
    seen_before = cache.get_seq_length()
    out2 = generate(llama, turn2, cache)
    assert torch.equal(out2[:, : turn2.shape[1]], turn2)
    assert cache.get_seq_length() == out2.shape[1] - 1 > seen_before
    # the same conversation fed by hand, token by token after the first turn, gives the same tokens
    ref = EvictionCache(llama, "streaming", **kw)
    generate(llama, turn1, ref)
    logits = llama(turn2[:, ref.get_seq_length():], **with_cache(llama, ref)).logits
    tokens = [turn2]
    for _ in range(GREEDY["max_new_tokens"]):
        tokens.append(logits[:, -1:].argmax(-1))
        logits = llama(tokens[-1], **with_cache(llama, ref)).logits
    assert torch.equal(torch.cat(tokens, -1)[:, : out2.shape[1]], out2)


def test_multi_turn_with_full_budget_matches_dynamic_cache(gemma):
    turn1 = prompt(30)
    caches = [DynamicCache(config=gemma.config), EvictionCache(gemma, "streaming", budget=512)]
    outs = []
    for cache in caches:
        out1 = generate(gemma, turn1, cache)
        outs.append(generate(gemma, torch.cat([out1, prompt(9, seed=3)], -1), cache))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_left_padded_batch_equals_rows_alone(factory):
    model = factory()
    kw = dict(budget=14, sinks=2, recent=4, slack=3)
    rows = [prompt(45, seed=4)[0], prompt(31, seed=5)[0], prompt(38, seed=6)[0]]
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    cache = EvictionCache(model, "streaming", **kw)
    batch = generate(model, ids, cache, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], EvictionCache(model, "streaming", **kw))
        assert torch.equal(batch[i, width:], alone[0, len(r):]), f"row {i}"
    # pads are never stored: every row holds at most budget + slack real entries per head
    stats = cache.stats()
    assert stats["tokens_seen"] == [len(r) + GREEDY["max_new_tokens"] - 1 for r in rows]
    full_layers = [l for l in cache.layers if l.sliding_window is None]
    assert all(int(l.kv.counts().max()) <= 14 + 3 for l in full_layers)


def test_beam_search_and_return_sequences_match_dynamic_cache(llama):
    ids = prompt(30)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12)
    ref = generate(llama, ids, DynamicCache(), **kw)
    assert torch.equal(generate(llama, ids, EvictionCache(llama, "streaming", budget=512), **kw), ref)
    cache = EvictionCache(llama, "streaming", budget=12, sinks=2, recent=4, slack=2)
    out = generate(llama, ids, cache, **kw)
    assert out.shape == ref.shape
    assert all(int(l.kv.counts().max()) <= 14 for l in cache.layers)


def test_batch_select_indices_takes_indices_or_a_mask(llama):
    EvictionCache(llama, "streaming", budget=64).batch_select_indices(torch.tensor([0]))  # nothing stored yet
    caches = [EvictionCache(llama, "streaming", budget=12, sinks=2, recent=4, slack=2) for _ in range(2)]
    for cache in caches:
        llama(prompt(30, batch=3), **with_cache(llama, cache))
    keys = caches[0].layers[0].kv.keys
    caches[0].batch_select_indices(torch.tensor([0, 2]))
    caches[1].batch_select_indices(torch.tensor([True, False, True]))
    for a, b in zip(*(c.layers for c in caches)):
        assert torch.equal(a.kv.keys, b.kv.keys) and torch.equal(a.kv.positions, b.kv.positions)
    assert torch.equal(caches[0].layers[0].kv.keys, keys[[0, 2]])


def test_sampling_with_several_sequences_per_prompt(llama):
    cache = EvictionCache(llama, "streaming", budget=12, sinks=2, recent=4, slack=2)
    out = generate(llama, prompt(30), cache, do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 3 and cache.layers[0].kv.keys.shape[0] == 3


def test_crop_rolls_back_recent_tokens(llama):
    ids = prompt(40)
    nxt = ids[:, 35:36]
    # without eviction, a crop is exact
    a, b = (EvictionCache(llama, "streaming", budget=512) for _ in range(2))
    llama(ids, **with_cache(llama, a))
    a.crop(-5)
    llama(ids[:, :35], **with_cache(llama, b))
    assert torch.allclose(llama(nxt, **with_cache(llama, a)).logits, llama(nxt, **with_cache(llama, b)).logits)
    # after eviction, the rolled-back tokens leave no entry behind
    c = EvictionCache(llama, "streaming", budget=16, sinks=2, recent=8, slack=0)
    llama(ids, **with_cache(llama, c))
    c.crop(-5)
    assert c.get_seq_length() == 35 and c.stats()["tokens_seen"] == [35]
    assert all(int(layer.kv.positions.max()) == 34 for layer in c.layers)
    with pytest.raises(ValueError, match="guaranteed"):
        c.crop(-20)
    c.crop(-3)  # crops add up: the last eviction guaranteed the tokens from 40 - 8 = 32 on, no earlier
    with pytest.raises(ValueError, match="only the tokens from position 32 on are guaranteed"):
        c.crop(-1)
    assert c.get_seq_length() == 32 and c.stats()["tokens_seen"] == [32]


def test_crop_of_the_latest_tokens_copies_nothing(llama):
    """crop(0) and crop(-k) of every head's last slots change the length in place: the spare room that
    lets decoding append without copying stays (assisted decoding crops at every step)."""
    cache = EvictionCache(llama, "streaming", budget=16, sinks=2, recent=8, slack=6)
    llama(prompt(40), **with_cache(llama, cache))
    llama(prompt(1, seed=3), **with_cache(llama, cache))  # one decoding step: room to spare now
    layer = cache.layers[0]
    before = layer.kv.positions.clone()
    pointer, capacity = layer.kv.buffers["keys"].data_ptr(), layer.kv.capacity
    assert capacity > layer.kv.length
    cache.crop(0)
    cache.crop(-2)
    assert layer.kv.buffers["keys"].data_ptr() == pointer and layer.kv.capacity == capacity
    assert torch.equal(layer.kv.positions, before[..., :-2]) and cache.get_seq_length() == 39
    # and the cropped cache goes on as one that never saw those tokens
    nxt = prompt(1, seed=4)
    other = EvictionCache(llama, "streaming", budget=16, sinks=2, recent=8, slack=6)
    llama(prompt(40), **with_cache(llama, other))
    other.crop(-1)
    assert torch.allclose(llama(nxt, **with_cache(llama, cache)).logits, llama(nxt, **with_cache(llama, other)).logits)


def assistant_near(factory, scale: float, drafts: int | None = None) -> torch.nn.Module:
    """A tiny model a little off the main one (its weights plus ``scale`` noise), so the main model
    rejects some of its drafts; with ``drafts``, it always drafts that many tokens."""
    assistant = factory()
    torch.manual_seed(1)
    for p in assistant.parameters():
        p.data += scale * torch.randn_like(p)
    if drafts is not None:
        config = assistant.generation_config
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = drafts, "constant"
        config.assistant_confidence_threshold = 0.0
    return assistant


@pytest.mark.parametrize("policy", ["streaming", "snapkv"])
def test_assisted_decoding_may_evict_once_it_runs(llama, policy):
    """transformers checks croppability once, after its first forward pass; later evictions keep the drafts
    (the number transformers names when it starts recording the past) besides the recent window, so
    rejected drafts are cropped away even when there are more of them than the recent window holds."""
    budget, recent, drafts = 48, 4, 10
    cache = EvictionCache(llama, policy, budget=budget, sinks=2, recent=recent, slack=0)
    assistant = assistant_near(tiny_llama, 0.02, drafts)
    out = generate(llama, prompt(20), cache, assistant_model=assistant, max_new_tokens=60)
    assert out.shape == (1, 80) and cache.stats()["evicted"] > 0
    assert all(int(layer.kv.counts().max()) <= budget for layer in cache.layers)
    for record in (False, True):
        c = EvictionCache(llama, policy, budget=budget, sinks=2, recent=recent, slack=0)
        if record:
            c.activate_past_recording(recurrent_states_to_keep=drafts)
        llama(prompt(60), **with_cache(llama, c))
        assert c.stats()["evicted"] > 0
        if record:  # every head holds the drafts' entries, and the crop takes them back
            assert all(bool(((layer.kv.positions >= 60 - drafts).sum(-1) == drafts).all()) for layer in c.layers)
            c.crop(-drafts)
            assert c.get_seq_length() == 60 - drafts
            assert all(int(layer.kv.positions.max()) < 60 - drafts for layer in c.layers)
        else:
            with pytest.raises(ValueError, match="guaranteed"):
                c.crop(-drafts)


def test_assisted_decoding_runs(llama):
    assistant = tiny_llama(layers=1)
    cache = EvictionCache(llama, "streaming", budget=512)
    ids = prompt(20)
    out = generate(llama, ids, cache, assistant_model=assistant, max_new_tokens=10)
    assert torch.equal(out, generate(llama, ids, DynamicCache(), max_new_tokens=10))


def test_assisted_decoding_refuses_a_cache_that_cannot_roll_back(llama):
    # after an eviction (and with H2O's sums at any time) a crop cannot restore the cache: transformers refuses
    assistant = tiny_llama(layers=1)
    evicted = EvictionCache(llama, "streaming", budget=8, sinks=2, recent=4, slack=0)
    with pytest.raises(ValueError, match="cropped"):
        generate(llama, prompt(40), evicted, assistant_model=assistant, max_new_tokens=4)
    assert evicted.layers[0].evicted > 0
    h2o = EvictionCache(llama, "h2o", budget=512)
    with pytest.raises(ValueError, match="cropped"):
        generate(llama, prompt(20), h2o, assistant_model=assistant, max_new_tokens=4)
    assert h2o.layers[0].evicted == 0 and not h2o.is_croppable
    assert resolve_policy("critical-h2o").scorer.accumulates and not resolve_policy("critical-snapkv").scorer.accumulates


def test_sliding_layers_stay_sliding(gemma):
    cache = EvictionCache(gemma, "streaming", budget=16, sinks=2, recent=4, slack=2)
    generate(gemma, prompt(50), cache)
    window = gemma.config.sliding_window
    for layer in cache.layers:
        pos = layer.kv.positions[0, 0]
        if layer.sliding_window is not None:
            assert pos.tolist() == list(range(cache.get_seq_length() - window + 1, cache.get_seq_length()))
        else:
            assert layer.kv.length <= 18 and pos[:2].tolist() == [0, 1]


def test_fraction_budget(llama):
    cache = EvictionCache(llama, "streaming", budget=0.25, sinks=2, recent=4, slack=0)
    llama(prompt(200), **with_cache(llama, cache))
    assert all(layer.kv.length == 50 for layer in cache.layers)


def test_assisted_decoding_on_sliding_window_model(gemma):
    # candidates that the main model rejects are cropped away, also from the sliding layers
    assistant = assistant_near(tiny_gemma3, 0.05)
    ids = prompt(30)
    ref = generate(gemma, ids, DynamicCache(config=gemma.config), max_new_tokens=12)
    out = generate(gemma, ids, EvictionCache(gemma, "streaming", budget=512), assistant_model=assistant,
                   max_new_tokens=12)
    assert torch.equal(out, ref)


def test_assisted_decoding_in_a_second_turn_on_a_sliding_window_model(gemma):
    """The first turn filled the sliding windows (they let entries go, evicting nothing): the cache stays
    croppable, so a second turn may decode with an assistant, as with transformers' own cache."""
    assistant = assistant_near(tiny_gemma3, 0.05)
    outputs = []
    for cache in (DynamicCache(config=gemma.config), EvictionCache(gemma, "streaming", budget=None)):
        first = generate(gemma, prompt(30), cache, max_new_tokens=6)
        ids = torch.cat([first, prompt(8, seed=2)], dim=1)
        outputs.append(generate(gemma, ids, cache, assistant_model=assistant, max_new_tokens=10))
    assert cache.stats()["trimmed"] > 0 and cache.stats()["evicted"] == 0
    assert torch.equal(*outputs)


def test_crop_counts_tokens_once_with_headwise_budgets(llama):
    cache = EvictionCache(llama, "adakv:snapkv", budget=12, sinks=2, recent=8, slack=0)
    llama(prompt(60), **with_cache(llama, cache))
    assert len({int(c) for layer in cache.layers for c in layer.kv.counts()[0]}) > 1  # heads differ
    cache.crop(-3)
    assert cache.stats()["tokens_seen"] == [57] and cache.get_seq_length() == 57


def test_headwise_budget_honours_slack(llama):
    cache = EvictionCache(llama, "adakv:snapkv", budget=12, sinks=2, recent=4, slack=6)
    out = llama(prompt(40), **with_cache(llama, cache))
    after_prefill = [layer.evicted for layer in cache.layers]
    for _ in range(5):  # 5 new tokens per head stay within the slack of 6
        out = llama(out.logits[:, -1:].argmax(-1), **with_cache(llama, cache))
    assert [layer.evicted for layer in cache.layers] == after_prefill
