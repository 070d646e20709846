"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig

from kvevict import EvictionCache, with_cache
from conftest import prompt, tiny_gemma3, tiny_llama


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(budget=36), "must exceed the protected"),  # 4 sinks + 32 recent
        (dict(budget=-3), "must exceed the protected"),
        (dict(budget=1.5), r"fraction.*\(0, 1\]"),
        (dict(budget=0.0), r"fraction.*\(0, 1\]"),
        (dict(budget="half"), "budget must be"),
        (dict(budget=True), "budget must be"),
        (dict(policy="nope"), "unknown scorer 'nope'"),
        (dict(policy="nowhere:streaming"), "unknown allocator 'nowhere'"),
        (dict(policy=3), "policy must be"),
        (dict(sinks=-1), "sinks and recent"),
        (dict(sinks=2.5), "sinks and recent must be ints >= 0, got sinks=2.5"),
        (dict(recent=True), "sinks and recent must be ints"),
        (dict(slack=-1), "slack"),
        (dict(slack=8.0), "slack must be an int >= 0, got 8.0"),
    ],
)
def test_bad_arguments(llama, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EvictionCache(llama, **kw)


def test_a_refused_cache_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="unknown scorer"):
        EvictionCache(model, "nope", budget=64)
    assert model.config._attn_implementation == before != "kvevict"
    model.config.layer_types = ["full_attention", "chunked_attention"]  # refused once the policy was resolved
    with pytest.raises(ValueError, match="chunked_attention"):
        EvictionCache(model, "streaming", budget=64)
    assert model.config._attn_implementation == before


def test_model_without_attention_layers():
    cfg = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(ValueError, match="standard attention"):
        EvictionCache(cfg)


def test_reuse_with_other_batch_size(llama):
    cache = EvictionCache(llama, budget=64)
    llama(prompt(10), **with_cache(llama, cache))
    with pytest.raises(ValueError, match="batch of 1 rows but got 2"):
        llama(prompt(10, batch=2), **with_cache(llama, cache))


def test_reuse_with_other_model(llama):
    cache = EvictionCache(llama, budget=64)
    llama(prompt(10), **with_cache(llama, cache))
    with pytest.raises(ValueError, match="another model"):
        other = tiny_gemma3()
        other(prompt(4), **with_cache(other, cache))


def test_dtype_mismatch(llama):
    cache = EvictionCache(llama, budget=64)
    llama(prompt(10), **with_cache(llama, cache))
    with pytest.raises(ValueError, match="float32 on cpu but the cache holds torch.float64"):
        other = tiny_llama().float()
        other(prompt(4), **with_cache(other, cache))


def test_model_not_using_kvevict_attention():
    model = tiny_llama()
    cache = EvictionCache(model.config, budget=64)
    with pytest.raises(RuntimeError, match="attn_implementation='kvevict'"):
        model(prompt(5), **with_cache(model, cache))


def test_kvevict_attention_without_eviction_cache_is_sdpa():
    model = tiny_llama()
    ids = prompt(12, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    reference = model(ids, attention_mask=mask).logits
    EvictionCache(model, budget=64)  # switches the model to kvevict attention
    assert model.config._attn_implementation == "kvevict"
    assert torch.allclose(model(ids, attention_mask=mask).logits, reference)


def test_scorer_with_an_unknown_default_allocator(llama):
    from kvevict.scoring import KNorm

    class Lost(KNorm):
        default_allocator = "nowhere"

    with pytest.raises(ValueError, match="unknown allocator 'nowhere'; known:"):
        EvictionCache(llama, Lost(), budget=64)


def test_benchmark_options_out_of_range_are_usage_errors(llama, capsys):
    import argparse

    from kvevict.evaluate import check_policy_names, workload_arguments

    p = argparse.ArgumentParser()
    workload_arguments(p)
    assert p.parse_args(["--continuation", "2", "--documents", "1"]).documents == 1
    for bad in (["--continuation", "1"], ["--documents", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        assert "must be an int >=" in capsys.readouterr().err
    check_policy_names(["full", "snapkv", "adakv:tova"], llama.config)
    with pytest.raises(ValueError, match="unknown scorer 'snapkvv'"):
        check_policy_names(["full", "snapkvv"], llama.config)


def test_demo_budget_is_entries_or_a_fraction_with_a_point():
    from kvevict.demo import budget_arg

    assert budget_arg("512") == 512 and isinstance(budget_arg("512"), int)
    assert budget_arg("0.25") == 0.25 and budget_arg("1.0") == 1.0 and isinstance(budget_arg("1.0"), float)
    with pytest.raises(ValueError):
        budget_arg("half")


def test_cli_lists_the_bench_commands_not_their_helpers():
    from kvevict.cli import main

    with pytest.raises(SystemExit) as usage:
        main(["bench", "nope"])
    assert "policies" in str(usage.value) and "ruler" in str(usage.value) and "kvpress_runner" not in str(usage.value)


def test_layer_tensors_cannot_be_replaced_from_outside(llama):
    cache = EvictionCache(llama, budget=64)
    llama(prompt(10), **with_cache(llama, cache))
    layer = cache.layers[0]
    with pytest.raises(RuntimeError, match="cannot be replaced"):
        layer.keys = layer.keys.clone()
    with pytest.raises(RuntimeError, match="offloading is not supported"):
        layer.offload()


def test_softmax_features_kvevict_does_not_compute_are_refused(tmp_path):
    """Gemma 2 soft-caps its attention logits: the evicting attention and calibration's soft eviction
    refuse it instead of silently computing another softmax."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from kvevict.calibrate import Recipe, calibrate

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=16, attn_logit_softcapping=50.0)).eval()
    with pytest.raises(ValueError, match="kvevict attention does not support \\['softcap'\\]"):
        model(prompt(40), **with_cache(model, EvictionCache(model, "streaming", budget=20, sinks=2, recent=4)))
    ids = torch.randint(2, 96, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-gemma2", seq_len=32, budget=8, steps=1, width=8)
    with pytest.raises(ValueError, match="calibration's soft eviction does not support \\['softcap'\\]"):
        calibrate(model, ids, recipe, tmp_path, "random tokens")
