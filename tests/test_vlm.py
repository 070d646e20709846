"""Vision-language models: image tagging (``prepare``), DART + quota eviction, budgets, on tiny random VLMs
of every supported family (see ``kvevict.tiny_vlms``)."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from transformers import DynamicCache

from conftest import prompt, tiny_llama
from kvevict import EvictionCache, with_cache
from kvevict.policy import Policy, resolve_policy
from kvevict.scoring import DART, ScoreInputs
from kvevict.selection import Quota, SelectionInputs
from kvevict.tiny_vlms import FAMILIES, IMAGE, SIZE, TOKENS_PER_IMAGE

NAMES = list(FAMILIES)
KW = dict(sinks=2, recent=4)


@lru_cache(maxsize=None)
def vlm(name: str):
    return FAMILIES[name]()


def generate(model, inputs, cache, max_new_tokens=8):
    return model.generate(**inputs, **with_cache(model, cache), max_new_tokens=max_new_tokens, do_sample=False)


def full_layers(cache: EvictionCache):
    return [layer for layer in cache.layers if layer.sliding_window is None]


def kept(layer, row: int = 0, head: int = 0) -> torch.Tensor:
    """Logical positions a (row, head) of a layer still stores."""
    pos = layer.kv.positions[row, head]
    return pos[pos >= 0]


# --------------------------------------------------------------------------- prepare: which entries are images


@pytest.mark.parametrize("name", NAMES)
def test_prepare_tags_exactly_the_image_placeholders(name):
    model, make_inputs = vlm(name)
    n_images = 2
    inputs = make_inputs(n_images, 5, batch=2)
    ids = inputs["input_ids"]
    cache = EvictionCache(model, "dart", budget=None)
    assert cache.prepare(inputs) is cache
    image = cache.modality.image
    assert torch.equal(image, ids == IMAGE)
    assert image.sum(-1).tolist() == [n_images * TOKENS_PER_IMAGE] * 2
    # wrapper tokens (vision start / end, BOI / EOI, <fake_token_around_image>) are text
    assert not image[ids != IMAGE].any()
    # the model accepts the hand-expanded inputs, and slot lookups give the tags of the stored positions
    model(**inputs, **with_cache(model, cache))
    for layer in cache.layers:
        pos = layer.kv.positions
        expected = image.gather(1, pos.clamp(min=0).flatten(1)).view_as(pos) & (pos >= 0)
        assert torch.equal(cache.modality.lookup(pos), expected)
    # a bare input_ids tensor does the same
    assert torch.equal(EvictionCache(model, "dart", budget=None).prepare(ids).modality.image, image)
    # reset empties the cache for another conversation, image positions included
    cache.reset()
    assert cache.modality.image is None and cache.get_seq_length() == 0


def test_prepare_without_image_token_raises():
    cache = EvictionCache(tiny_llama(layers=1), "dart", budget=32, **KW)
    with pytest.raises(ValueError, match="image token"):
        cache.prepare(prompt(10))


# --------------------------------------------------------------------------- generate under eviction


@pytest.mark.parametrize("name", NAMES)
def test_generate_evicts_within_budget(name):
    model, make_inputs = vlm(name)
    inputs = make_inputs(3, 8, batch=2)
    budget, slack = 24, 2
    cache = EvictionCache(model, "dart", budget=budget, slack=slack, **KW).prepare(inputs)
    out = generate(model, inputs, cache)
    n = inputs["input_ids"].shape[1]
    assert out.shape == (2, n + 8)
    stats = cache.stats()
    assert stats["evicted"] > 0
    assert stats["tokens_seen"] == [n + 7] * 2
    for layer, entries in zip(cache.layers, stats["entries"]):
        limit = budget + slack if layer.sliding_window is None else layer.sliding_window - 1
        assert max(max(row) for row in entries) <= limit, f"layer {layer.layer_idx}: {entries}"


@pytest.mark.parametrize("name", NAMES)
def test_large_budget_matches_dynamic_cache(name):
    model, make_inputs = vlm(name)
    inputs = make_inputs(2, 6)
    cache = EvictionCache(model, "dart", budget=512, **KW).prepare(inputs)
    out = generate(model, inputs, cache)
    reference = generate(model, inputs, DynamicCache(config=model.config.get_text_config()))
    assert torch.equal(out, reference)
    assert torch.equal(generate(model, inputs, None), reference)  # generate's own default cache
    assert all(layer.evicted == 0 for layer in full_layers(cache))


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_before_any_scoring_keeps_the_image_map(name):
    """Under the budget nothing is scored, so the map never met the beams' rows before the first reorder:
    it is fitted to them there, and the beams decode as with transformers' cache."""
    model, make_inputs = vlm(name)
    inputs = make_inputs(1, 6, batch=2)  # 2 prompts x 2 beams: the first reorder reads rows 0 and 2
    cache = EvictionCache(model, "dart", budget=512, **KW).prepare(inputs)
    beams = dict(num_beams=2, max_new_tokens=6, do_sample=False)
    out = model.generate(**inputs, **with_cache(model, cache), **beams)
    reference = model.generate(**inputs, **with_cache(model, DynamicCache(config=model.config.get_text_config())),
                               **beams)
    assert torch.equal(out, reference) and cache.modality.image.shape[0] == 4


@pytest.mark.parametrize("name", NAMES)
def test_bytes_follow_the_budget(name):
    model, make_inputs = vlm(name)
    inputs = make_inputs(4, 8)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_entry = 2 * head_dim * 4 + 8 + 4  # float32 key + value, int64 position, float32 attention bias
    stats = {}
    for budget in (16, 32):
        cache = EvictionCache(model, "dart", budget=budget, slack=0, **KW).prepare(inputs)
        generate(model, inputs, cache)
        stats[budget] = cache.stats()
        # memory really is released: bytes held are the entries kept
        assert stats[budget]["bytes"] == stats[budget]["entries_total"] * per_entry
        assert all(layer.kv.length == budget for layer in full_layers(cache))
    n_full = len(full_layers(cache))
    grown = stats[32]["bytes"] - stats[16]["bytes"]
    assert grown == pytest.approx(per_entry * text.num_key_value_heads * n_full * 16, rel=0.1)
    if n_full == text.num_hidden_layers:  # no sliding layers: bytes are proportional to the budget
        assert stats[32]["bytes"] / stats[16]["bytes"] == pytest.approx(2.0, rel=0.1)


# --------------------------------------------------------------------------- DART: duplicates go first


def _entries(dup_keys_equal_pivot: bool) -> tuple[ScoreInputs, torch.Tensor]:
    """One row, one head, 14 entries: text 0-5, image pivots 6-9 (largest key norms), image 10-11 duplicating
    pivot 6's value, distinct images 12-13. Values are basis vectors, so cosine similarities are 0 or 1."""
    s, d = 14, 16
    eye = torch.eye(d)
    values = eye[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 6, 12, 13]].clone()
    keys = 0.1 * eye[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]].clone()
    keys[6:10] *= torch.tensor([100.0, 90.0, 80.0, 70.0])[:, None]  # the four image pivots
    if dup_keys_equal_pivot:
        keys[10:12] = keys[6]  # exact duplicates: same key and value as pivot 6
    else:
        keys[10:12] = 5.0 * eye[[14, 15]]  # same value, another key (as at another RoPE position)
    image = torch.zeros(s, dtype=torch.bool)
    image[6:] = True
    inputs = ScoreInputs(keys=keys.view(1, 1, s, d), values=values.view(1, 1, s, d),
                         positions=torch.arange(s).view(1, 1, s), layer_idx=0, seen=s, scaling=1.0, state={},
                         image=image.view(1, 1, s))
    return inputs, image


def _quota_keep(inputs: ScoreInputs, scores: torch.Tensor, budget: int, allocator=None) -> torch.Tensor:
    valid = inputs.valid
    protected = valid & (inputs.positions < 2)  # two text sinks
    x = SelectionInputs(scores, valid, protected, torch.tensor([budget]), inputs.image)
    allocator = allocator or resolve_policy("dart").allocator
    return (allocator.select(x) | protected)[0, 0]


def test_dart_scores_value_duplicates_of_a_pivot_lowest_and_quota_evicts_them_first():
    inputs, image = _entries(dup_keys_equal_pivot=False)
    scores = DART().score(inputs)[0, 0]
    assert scores[6:10].tolist() == [2.0] * 4  # pivots
    assert scores[10:12].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # duplicates of pivot 6
    assert scores[12:14].tolist() == pytest.approx([1.0, 1.0])  # nothing like them
    assert torch.equal(scores[:6], torch.arange(6.0))  # text: StreamingLLM (recency)
    # "dart" = DART under quotas: 8 of 14 entries are images, so a budget of 10 gives images 6 slots
    keep = _quota_keep(inputs, scores.view(1, 1, -1), budget=10)
    assert keep[image].sum() == 6 and not keep[10:12].any()
    assert keep.sum() == 10


def test_dart_exact_duplicates_of_a_pivot_are_not_all_pivots():
    """Identical entries (same key, same value) tie on key norm: only one of them may be a pivot, the
    others duplicate it and must be the first images to go."""
    inputs, image = _entries(dup_keys_equal_pivot=True)
    scores = DART().score(inputs)[0, 0]
    twins = scores[[6, 10, 11]]
    assert (twins == 2.0).sum() == 1, f"scores of the three identical entries: {twins.tolist()}"
    assert sorted(twins.tolist())[:2] == pytest.approx([0.0, 0.0], abs=1e-6)
    keep = _quota_keep(inputs, scores.view(1, 1, -1), budget=10)
    assert keep[[6, 10, 11]].sum() == 1 and keep[12:14].all()


def test_dart_keeps_a_pivot_in_slot_0_when_there_are_fewer_images_than_pivots():
    # two image entries for four pivots: the missing pivots must not unmark the one in slot 0
    s, d = 6, 8
    eye = torch.eye(d)
    keys = eye[:s] * torch.tensor([9.0, 8.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    image = torch.tensor([True, True, False, False, False, False])
    inputs = ScoreInputs(keys=keys.view(1, 1, s, d), values=eye[:s].view(1, 1, s, d),
                         positions=torch.arange(s).view(1, 1, s), layer_idx=0, seen=s, scaling=1.0, state={},
                         image=image.view(1, 1, s))
    assert DART(pivots=4).score(inputs)[0, 0, :2].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "gemma3"])
def test_identical_images_lose_entries_before_the_distinct_one(name):
    """Prompt with images A, A, B, A. In the first decoder layer identical images have identical values,
    so DART (with as many pivots as an image has tokens) must keep more of B than of an average copy of A.
    (Gemma3's first layer slides: its full-attention layer sees the copies in different contexts.)"""
    model, make_inputs = vlm(name)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, SIZE, SIZE, generator=g)
    inputs = make_inputs(4, 8, images=torch.stack([a, a, b, a]))
    ids = inputs["input_ids"][0]
    which = torch.full_like(ids, -1)
    which[ids == IMAGE] = torch.arange(4 * TOKENS_PER_IMAGE) // TOKENS_PER_IMAGE  # image index per position
    policy = Policy(DART(pivots=TOKENS_PER_IMAGE), Quota())
    cache = EvictionCache(model, policy, budget=36, slack=0, **KW).prepare(inputs)
    model(**inputs, **with_cache(model, cache))
    layer = cache.layers[0]
    for head in range(layer.kv.positions.shape[1]):
        w = which[kept(layer, 0, head)]
        per_image = torch.bincount(w[w >= 0], minlength=4)
        assert per_image.sum() < 4 * TOKENS_PER_IMAGE  # images were evicted
        copies_of_a = per_image[[0, 1, 3]].float().mean()
        assert per_image[2] > copies_of_a, f"head {head}: entries kept per image (A, A, B, A) {per_image.tolist()}"


# --------------------------------------------------------------------------- quotas: text vs image shares


def _modality_counts(cache: EvictionCache, layer) -> tuple[int, int, torch.Tensor]:
    pos = layer.kv.positions[0, 0]
    is_image = cache.modality.lookup(layer.kv.positions)[0, 0][pos >= 0]
    pos = pos[pos >= 0]
    return int(is_image.sum()), int((~is_image).sum()), pos[~is_image]


@pytest.mark.parametrize("name", NAMES)
def test_image_share_zero_keeps_text_and_drops_images(name):
    model, make_inputs = vlm(name)
    inputs = make_inputs(2, 30)  # more text than the budget
    budget = 20
    cache = EvictionCache(model, Policy(DART(), Quota(image_share=0.0)), budget=budget, slack=0, **KW)
    generate(model, inputs, cache.prepare(inputs), max_new_tokens=4)
    for layer in full_layers(cache):
        n_image, n_text, _ = _modality_counts(cache, layer)
        assert (n_image, n_text) == (0, budget), f"layer {layer.layer_idx}"


@pytest.mark.parametrize("name", NAMES)
def test_image_share_one_keeps_images_and_only_protected_text(name):
    model, make_inputs = vlm(name)
    inputs = make_inputs(3, 10)  # more image tokens than the budget
    budget = 20
    cache = EvictionCache(model, Policy(DART(), Quota(image_share=1.0)), budget=budget, slack=0, **KW)
    generate(model, inputs, cache.prepare(inputs), max_new_tokens=4)
    seen = cache.get_seq_length()
    protected = {0, 1, *range(seen - KW["recent"], seen)}
    for layer in full_layers(cache):
        n_image, n_text, text_pos = _modality_counts(cache, layer)
        assert set(text_pos.tolist()) == protected, f"layer {layer.layer_idx}: text kept {text_pos.tolist()}"
        assert n_image + n_text <= budget, f"layer {layer.layer_idx}: {n_image} image + {n_text} text entries"


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0, None])
def test_quota_never_exceeds_the_budget_with_protected_entries(share):
    """Protected entries count against the budget: a modality whose protected entries exceed its quota
    takes them from the other modality's quota (the cache ORs the protected entries into the selection)."""
    s = 12
    valid = torch.ones(1, 1, s, dtype=torch.bool)
    image = torch.zeros(1, 1, s, dtype=torch.bool)
    image[..., 2:9] = True  # 2 text sinks, 7 images, 3 recent text tokens
    protected = valid.clone()
    protected[..., 2:9] = False
    x = SelectionInputs(torch.arange(float(s)).view(1, 1, s), valid, protected, torch.tensor([6]), image)
    keep = Quota(image_share=share).select(x) | protected
    assert int(keep.sum()) <= 6, f"kept {int(keep.sum())} entries: {keep[0, 0].int().tolist()}"


def test_quota_shares_split_the_budget():
    s = 20
    valid = torch.ones(1, 1, s, dtype=torch.bool)
    image = torch.zeros(1, 1, s, dtype=torch.bool)
    image[..., 5:15] = True  # 10 images between 5 + 5 text entries
    scores = torch.rand(1, 1, s, generator=torch.Generator().manual_seed(0))
    nothing = torch.zeros_like(valid)

    def counts(share, budget):
        x = SelectionInputs(scores, valid, nothing, torch.tensor([budget]), image)
        keep = Quota(image_share=share).select(x)[0, 0]
        return int(keep[image[0, 0]].sum()), int(keep[~image[0, 0]].sum())

    assert counts(0.0, 8) == (0, 8)
    assert counts(0.0, 14) == (4, 10)  # text needs less than its share: images get the rest
    assert counts(1.0, 8) == (8, 0)
    assert counts(1.0, 14) == (10, 4)
    assert counts(0.5, 8) == (4, 4)
    assert counts(None, 8) == (4, 4)  # share of images held: 10 / 20
