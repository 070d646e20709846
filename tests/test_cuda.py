"""On a GPU the cache, every policy and calibration give what they give on the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvevict import EvictionCache, with_cache
from kvevict.calibrate import Recipe, calibrate
from kvevict.gates import Fingerprint, RetentionGates
from kvevict.policy import Policy
from kvevict.scoring import SCORERS
from kvevict.scoring.learned import LearnedRetention
from kvevict.selection import make_allocator
from conftest import prompt, tiny_gemma3, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = dict(do_sample=False, max_new_tokens=16)
POLICIES = sorted(set(SCORERS) - {"learned", "dart"}) + ["pyramid:snapkv", "adakv:keydiff", "global-sum:tova"]


def generate(model, ids, cache):
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, **with_cache(model, cache), **GREEDY, prefill_chunk_size=16)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("name", POLICIES)
def test_policy_on_gpu_evicts_as_on_cpu(factory, name):
    cpu = factory()
    gpu = factory().cuda()
    ids = prompt(48, batch=2)
    kw = dict(budget=16, slack=4, sinks=2, recent=4)
    on_cpu, on_gpu = EvictionCache(cpu, name, **kw), EvictionCache(gpu, name, **kw)
    expected = generate(cpu, ids, on_cpu)
    got = generate(gpu, ids.cuda(), on_gpu)
    assert on_gpu.stats()["evicted"] == on_cpu.stats()["evicted"] > 0
    assert all(layer.kv.keys.is_cuda for layer in on_gpu.layers)
    if name in ("random", "knorm"):  # CUDA's random stream is not the CPU's; equal tokens tie on key norm
        return
    assert torch.equal(got.cpu(), expected), name
    for a, b in zip(on_cpu.layers, on_gpu.layers):
        assert torch.equal(a.kv.positions, b.kv.positions.cpu())


def test_full_budget_on_gpu_matches_dynamic_cache():
    model = tiny_llama().cuda()
    ids = prompt(40).cuda()
    reference = generate(model, ids, DynamicCache(config=model.config))
    assert torch.equal(generate(model, ids, EvictionCache(model, "streaming", budget=512)), reference)


def test_learned_policy_with_cpu_gates_runs_on_gpu():
    cpu, gpu = tiny_llama(), tiny_llama().cuda()
    torch.manual_seed(3)
    gates = RetentionGates(Fingerprint.of(cpu.config), width=16).double()
    kept = []
    for model in (cpu, gpu):
        policy = Policy(LearnedRetention(RetentionGates(gates.fingerprint, width=16).double()), make_allocator("global"))
        policy.scorer.gates.load_state_dict(gates.state_dict())
        cache = EvictionCache(model, policy, budget=12, slack=0, sinks=2, recent=4)
        model(prompt(40).to(model.device), **with_cache(model, cache))
        kept.append([layer.kv.positions.cpu() for layer in cache.layers])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_calibration_on_gpu_lowers_the_loss(tmp_path):
    model = tiny_llama().cuda()
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16)
    card, history = calibrate(model, ids, recipe, tmp_path, "random tokens", checkpoint=tmp_path / "ckpt")
    loss = [h["kl"] + h["capacity"] for h in history]
    assert sum(loss[-5:]) < 0.5 * sum(loss[:5])
    assert "NVIDIA" in card.read_text() or "cuda" in card.read_text().lower()
