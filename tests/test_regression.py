"""Regression calibration (KVzap-style): KVzip+ targets from one chunked pass, and gates fitted to them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache

from kvevict import EvictionCache, Policy, with_cache
from kvevict.calibrate import Recipe
from kvevict.gates import Fingerprint, load_gates
from kvevict.targets import kvzip_targets, reuse_targets, repeat_prompt
from kvevict.regression import METHOD, calibrate_regression, extract
from kvevict.scoring.learned import LearnedRetention
from kvevict.selection import Global
from conftest import prompt, tiny_gemma3, tiny_llama

FRAME = ([1], [5, 6, 7])  # token ids before the context, and between it and its repetition


def recipe(**change) -> Recipe:
    return Recipe(**{"model": "tiny-llama", "method": "regression", "seq_len": 64, "steps": 20,
                     "tokens_per_window": 48, "epochs": 8, "lr": 1e-2, "width": 16, **change})


@pytest.fixture(scope="module")
def text() -> list[int]:
    return torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def regressed(tmp_path_factory, text):
    model = tiny_llama()
    out = tmp_path_factory.mktemp("policies")
    card, history = calibrate_regression(model, text, FRAME, recipe(), out, "random tokens", checkpoint=out / "ckpt")
    return model, card, history


def eager_pass(model, ids: torch.Tensor) -> tuple[tuple, dict, DynamicCache]:
    """One unchunked eager pass: attention probabilities per layer, attention inputs ``[n, D]`` per
    layer, and the cache (its values)."""
    inputs = {}

    def keep(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"][0]

    hooks = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache(config=model.config)
        attentions = model(ids, output_attentions=True, **with_cache(model, cache)).attentions
    finally:
        model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    return attentions, inputs, cache


def value_norms(model, cache: DynamicCache, layer: int, query_heads: int) -> torch.Tensor:
    """``||W_o^g v_i||`` ``[Hq, n]``, head by head."""
    attn = model.model.layers[layer].self_attn
    v = cache.layers[layer].values[0]
    v = v.repeat_interleave(query_heads // v.shape[0], 0)
    d = attn.head_dim
    return torch.stack([(v[g] @ attn.o_proj.weight[:, g * d : (g + 1) * d].T).norm(dim=-1) for g in range(query_heads)])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_kvzip_targets_equal_the_attention_of_one_eager_pass(make):
    """Chunked KVzip+ targets = max over repeated tokens (and query heads of a KV head) of
    attention x ||W_o v|| / ||attention input||, from one unchunked eager pass."""
    model = make()
    context = prompt(40)[0].tolist()
    fp = Fingerprint.of(model.config)
    got = kvzip_targets(model, context, FRAME, fp.full_layers, fp.kv_heads, chunk=16)
    assert model.config._attn_implementation == "sdpa"  # restored

    ids, ctx, rep = repeat_prompt(context, FRAME)
    attentions, inputs, cache = eager_pass(model, ids)
    for layer in fp.full_layers:
        probs = attentions[layer][0]  # [Hq, n, n]
        norms = value_norms(model, cache, layer, probs.shape[0])
        share = probs[:, rep, ctx] * norms[:, None, ctx] / inputs[layer][rep].norm(dim=-1)[None, :, None]
        want = share.amax(1).view(fp.kv_heads, -1, len(context)).amax(1).log()
        x, y = got[layer]
        assert y.shape == (fp.kv_heads, len(context))
        torch.testing.assert_close(y, want.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x, inputs[layer][ctx].float())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_reuse_targets_count_the_later_tokens_whose_top_tenth_holds_the_entry(make):
    model = make()
    window = prompt(50)[0].tolist()
    fp = Fingerprint.of(model.config)
    got = reuse_targets(model, window, fp.full_layers, fp.kv_heads, chunk=16)
    attentions, inputs, cache = eager_pass(model, torch.tensor([window]))
    n, half = len(window), len(window) // 2
    for layer in fp.full_layers:
        probs = attentions[layer][0]  # [Hq, n, n]
        contribution = probs * value_norms(model, cache, layer, probs.shape[0])[:, None, :]
        reads = torch.zeros(probs.shape[0], half)
        for t in range(n):
            top = contribution[:, t, : t + 1].sort(-1, descending=True).values[:, math.ceil(0.1 * (t + 1)) - 1]
            for i in range(min(t, half)):  # later tokens only (t > i)
                reads[:, i] += (contribution[:, t, i] >= top).float()
        share = reads.view(fp.kv_heads, -1, half).amax(1) / (n - 1 - torch.arange(half))
        x, y = got[layer]
        torch.testing.assert_close(y, (share * n).clamp(min=1).log().float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x, inputs[layer][:half].float())


def test_regression_fit_learns_the_targets(regressed):
    _, card, history = regressed
    assert history[-1]["held_out_mse"] < 0.5 * history[0]["held_out_mse"]
    assert history[-1]["held_out_rank_correlation"] > 0.7
    saved = json.loads(card.read_text())
    assert saved["method"] == METHOD["kvzip"] and saved["target_budget"] == 0 and saved["steps"] == 20
    assert saved["metrics"]["entries"] == 20 * 48 and saved["metrics"]["hardware"].endswith("CPU (2 threads)")
    assert saved["metrics"]["held_out_rank_correlation"] == history[-1]["held_out_rank_correlation"]


def test_regressed_gates_drive_a_global_budget(regressed):
    model, card, _ = regressed
    gates, _ = load_gates(model.config, card)
    cache = EvictionCache(model, Policy(LearnedRetention(gates), Global()), budget=12, sinks=2, recent=4, slack=2)
    out = model.generate(prompt(60), **with_cache(model, cache), do_sample=False, max_new_tokens=10, prefill_chunk_size=16)
    assert out.shape[1] == 70 and cache.get_seq_length() == 69  # the last token is never fed back
    stats = cache.stats()
    assert stats["entries_total"] <= 2 * model.config.num_key_value_heads * (12 + 2) and stats["evicted"] > 0


@pytest.mark.parametrize("target", ["kvzip", "reuse"])
def test_extraction_resumes_from_its_checkpoint(regressed, text, tmp_path, target):
    model = regressed[0]
    settings = {"target": target, "tokens_per_window": 24}
    whole = extract(model, text, FRAME, recipe(**settings))
    assert whole[0].shape == (2, 20 * 24, 64) and whole[1].shape == (2, 20 * 24, 2)
    extract(model, text, FRAME, recipe(steps=5, **settings), tmp_path)  # an interrupted run
    assert len(list(tmp_path.glob("window-*.safetensors"))) == 5
    resumed = extract(model, text, FRAME, recipe(**settings), tmp_path)
    assert torch.equal(whole[0], resumed[0]) and torch.equal(whole[1], resumed[1])
    with pytest.raises(ValueError, match="other settings"):
        extract(model, text, FRAME, recipe(seq_len=48, **settings), tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"method": "bogus"}, "unknown calibration method"),
    ({"tokens_per_window": 0}, "tokens_per_window must be an int >= 1"),
    ({"tokens_per_window": 8.5}, "tokens_per_window must be an int >= 1"),
    ({"tokens_per_window": 65}, "tokens_per_window must lie in 1..64"),
    ({"target": "reuse", "tokens_per_window": 33}, "tokens_per_window must lie in 1..32"),
    ({"target": "bogus"}, "unknown regression target"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
])
def test_bad_regression_recipes_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        recipe(**change)


def test_regression_report(regressed, bench_script, tmp_path):
    _, card, history = regressed
    script = bench_script("calibrate", folder="calibration")
    script.report(recipe(), history, json.loads(card.read_text()), tmp_path, "tiny-regression")
    text = (tmp_path / "tiny-regression.md").read_text()
    assert METHOD["kvzip"] in text and "20 windows of 64 tokens" in text and "rank correlation" in text
    assert "![loss curve](tiny-regression.png)" in text and (tmp_path / "tiny-regression.png").stat().st_size > 0
