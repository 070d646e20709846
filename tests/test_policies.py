"""The policy suite: scorers keep the top of their scores, allocators respect their budgets."""

from __future__ import annotations

import pytest
import torch

from kvevict import EvictionCache, Policy, with_cache
from kvevict.policy import resolve_policy
from kvevict.scoring import SCORERS, Scorer, ScoreInputs
from kvevict.selection import AdaKV, Global, Pyramid, SelectionInputs, Threshold, Uniform, topk_per_head
from conftest import left_padded, prompt, tiny_gemma3, tiny_llama

SCORER_NAMES = sorted(SCORERS) + ["critical-snapkv"]
PROTECT = dict(sinks=2, recent=4)


class Recording(Scorer):
    """Wraps a scorer and records, per layer, the positions and scores of its last call."""

    name = "recording"

    def __init__(self, base: Scorer) -> None:
        self.base, self.query_window, self.observes = base, base.query_window, base.observes
        self.calls: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def observe(self, inputs: ScoreInputs) -> None:
        self.base.observe(inputs)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = self.base.score(inputs)
        self.calls[inputs.layer_idx] = (inputs.positions.clone(), scores.clone(), inputs.seen)
        return scores


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_kept_set_is_top_of_scores(llama, name):
    budget = 12
    recorder = Recording(resolve_policy(name).scorer)
    cache = EvictionCache(llama, recorder, budget=budget, slack=0, **PROTECT)
    llama(prompt(40, batch=2), **with_cache(llama, cache))
    assert len(recorder.calls) == llama.config.num_hidden_layers
    for layer in cache.layers:
        positions, scores, seen = recorder.calls[layer.layer_idx]
        for b in range(2):
            for h in range(positions.shape[1]):
                pos, sc = positions[b, h], scores[b, h].float()
                protected = (pos < PROTECT["sinks"]) | (pos >= seen - PROTECT["recent"])
                free = (~protected).nonzero().flatten()
                best = free[sc[free].topk(budget - int(protected.sum())).indices]
                expected = set(pos[protected].tolist()) | set(pos[best].tolist())
                assert set(layer.kv.positions[b, h].tolist()) == expected, (name, layer.layer_idx, b, h)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "expected_attention", "adakv:keydiff"])
def test_padded_batch_equals_rows_alone(name):
    model = tiny_llama()
    kw = dict(budget=14, slack=3, **PROTECT)
    rows = [prompt(45, seed=4)[0], prompt(31, seed=5)[0]]
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    gen = dict(do_sample=False, max_new_tokens=16)  # chunk boundaries would differ between batch and alone
    batch = model.generate(ids, attention_mask=mask, **with_cache(model, EvictionCache(model, name, **kw)), **gen)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones_like(r[None]),
                               **with_cache(model, EvictionCache(model, name, **kw)), **gen)
        assert torch.equal(batch[i, width:], alone[0, len(r):]), f"row {i}"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("name", ["h2o", "snapkv", "pyramid:tova", "global-sum:snapkv"])
def test_policies_run_through_generate(factory, name):
    model = factory()
    cache = EvictionCache(model, name, budget=16, slack=4, **PROTECT)
    out = model.generate(prompt(50), **with_cache(model, cache), do_sample=False, max_new_tokens=12,
                         prefill_chunk_size=16)
    assert out.shape[1] == 62 and cache.stats()["evicted"] > 0


def test_pyramid_budgets_fall_with_depth():
    model = tiny_llama(layers=4)
    cache = EvictionCache(model, "pyramid:knorm", budget=20, slack=0, **PROTECT)
    model(prompt(80), **with_cache(model, cache))
    lengths = [layer.kv.length for layer in cache.layers]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > 20 > lengths[-1]
    assert abs(sum(lengths) / len(lengths) - 20) <= 1


def test_adakv_headwise_budgets_and_real_memory(llama):
    budget = 16
    cache = EvictionCache(llama, Policy(SCORERS["snapkv"](), AdaKV(floor=0.25)), budget=budget, slack=0, **PROTECT)
    llama(prompt(120), **with_cache(llama, cache))
    full_bytes = 0
    for layer in cache.layers:
        counts = layer.kv.counts()[0]
        assert int(counts.sum()) <= counts.numel() * budget
        assert int(counts.min()) >= max(4, budget // 4)  # the safeguard (and the protected entries)
        # storage is as long as the longest head: bytes held follow the kept entries, not the context
        assert layer.kv.length == int(counts.max())
        full_bytes += 120 * counts.numel() * (2 * 16 * 8 + 8)
    assert cache.stats()["bytes"] < full_bytes / 3


def test_global_budget_spans_layers():
    model = tiny_llama(layers=3)
    cache = EvictionCache(model, "global-zscore:knorm", budget=16, slack=0, **PROTECT)
    model(prompt(90), **with_cache(model, cache))
    counts = [int(layer.kv.counts().sum()) for layer in cache.layers]
    heads = model.config.num_key_value_heads
    assert sum(counts) <= 3 * heads * 16 and len(set(counts)) > 1


def test_global_budget_holds_at_every_step_of_a_padded_batch():
    model = tiny_llama(layers=3)
    slack, budget, heads = 3, 16, model.config.num_key_value_heads
    cache = EvictionCache(model, "global-zscore:knorm", budget=budget, slack=slack, **PROTECT)
    ids = prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :25] = 0  # the second row is left-padded: it stays under the budget for a while
    model(ids, attention_mask=mask, **with_cache(model, cache))
    token = ids[:, -1:]
    for _ in range(30):
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        model(token, attention_mask=mask, **with_cache(model, cache))
        held = sum(layer.kv.counts().sum(-1) for layer in cache.layers)
        assert bool((held <= 3 * heads * (budget + slack)).all()), held.tolist()
    assert cache.stats()["evicted"] > 0


class StarvedHead(Scorer):
    """Calibrated scores where KV head 0 of every layer is worth far less than the others."""

    name = "starved"
    calibrated = True

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        s = inputs.positions.float()
        s[:, 0] -= 1e6
        return s


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_global_floor_keeps_every_head_fed(llama, floor):
    budget, sinks, recent = 16, 2, 4
    cache = EvictionCache(llama, Policy(StarvedHead(), Global(floor=floor)), budget=budget, slack=0, sinks=sinks,
                          recent=recent)
    llama(prompt(80), **with_cache(llama, cache))
    for layer in cache.layers:
        starved = int(layer.kv.counts()[0, 0])
        assert starved == (sinks + recent if floor == 0 else budget // 2)
    assert sum(int(layer.kv.counts().sum()) for layer in cache.layers) <= 2 * 2 * budget


def test_balanced_global_budget_is_the_memory_held():
    # Two layers, two heads: layer 0's head 1 holds the best scores, layer 1's heads are mediocre alike.
    scores = [torch.tensor([[[1.0, 2, 3, 4, 5, 6], [90, 80, 70, 60, 20, 10]]]),
              torch.tensor([[[30.0, 31, 32, 33, 34, 35], [35.5, 34.5, 33.5, 32.5, 31.5, 30.5]]])]
    inputs = [SelectionInputs(s, torch.ones_like(s, dtype=torch.bool), torch.zeros_like(s, dtype=torch.bool),
                              torch.tensor([3])) for s in scores]
    unbalanced = Global().select_all(inputs, torch.tensor([12]))
    assert [k.sum(-1).tolist() for k in unbalanced] == [[[0, 4]], [[4, 4]]]  # 16 slots stored: 4 of them empty
    keep = Global(balance=True).select_all(inputs, torch.tensor([12]))
    # layer 0's ranks are worth 90, 80, 70, 60, 20, 10; layer 1's 35.5, 34.5, ...: the 6 best ranks are 4 + 2
    assert [k.sum(-1).tolist() for k in keep] == [[[4, 4]], [[2, 2]]]
    assert keep[0][0, 1].tolist() == [True] * 4 + [False] * 2 and keep[0][0, 0].tolist() == [False] * 2 + [True] * 4
    assert keep[1][0, 0].tolist() == [False] * 4 + [True] * 2 and keep[1][0, 1].tolist() == [True] * 2 + [False] * 4
    # a floor of 0.8 x the even share (12 / 4 heads = 3) guarantees each layer 3 slots per head: all it can get
    floored = Global(balance=True, floor=0.8).select_all(inputs, torch.tensor([12]))
    assert [k.sum(-1).tolist() for k in floored] == [[[3, 3]], [[3, 3]]]
    assert floored[0][0, 1].tolist() == [True] * 3 + [False] * 3


def test_balanced_global_budget_leaves_no_empty_slots(llama):
    budget = 16
    caches = {name: EvictionCache(llama, Policy(StarvedHead(), Global(balance=name == "balanced")), budget=budget,
                                  slack=0, **PROTECT) for name in ("global", "balanced")}
    for cache in caches.values():
        llama(prompt(80), **with_cache(llama, cache))
    for layer in caches["balanced"].layers:
        assert not layer.kv.has_holes and layer.kv.length <= 2 * budget
    held = {name: sum(layer.kv.length for layer in cache.layers) for name, cache in caches.items()}
    assert held["balanced"] <= 2 * budget < held["global"]  # padded slots of the starved heads


def test_threshold_keeps_scores_above_tau(llama):
    recorder = Recording(SCORERS["knorm"]())
    tau = -0.63  # about the median key norm of the tiny model
    cache = EvictionCache(llama, Policy(recorder, Threshold(tau)), budget=None, slack=8, **PROTECT)
    llama(prompt(60), **with_cache(llama, cache))
    for layer in cache.layers:
        positions, scores, seen = recorder.calls[layer.layer_idx]
        keep = (scores >= tau) | (positions < 2) | (positions >= seen - 4)
        assert torch.equal(layer.kv.counts(), keep.sum(-1))
    assert 0 < cache.stats()["evicted"] < 60 * 2 * 2


def test_policy_errors(llama):
    with pytest.raises(ValueError, match="not calibrated"):
        EvictionCache(llama, "global:snapkv", budget=32)
    with pytest.raises(ValueError, match="pass budget=None"):
        EvictionCache(llama, Policy(SCORERS["knorm"](), Threshold(0.0)), budget=32)
    with pytest.raises(ValueError, match="needs its tau"):
        resolve_policy("threshold:knorm")
    with pytest.raises(ValueError, match="unknown scorer 'critical-nope'|unknown scorer 'nope'"):
        EvictionCache(llama, "critical-nope", budget=64)
    with pytest.raises(ValueError, match="odd"):
        SCORERS["snapkv"](kernel=4)
    for name in ("snapkv", "expected_attention"):
        for window in (0, -5, 2.5):
            with pytest.raises(ValueError, match="query window"):
                SCORERS[name](window=window)
    with pytest.raises(ValueError, match="non-negative"):
        cache = EvictionCache(llama, Policy(SCORERS["knorm"](), Global("sum")), budget=10, slack=0, **PROTECT)
        llama(prompt(40), **with_cache(llama, cache))


def test_registry_names_resolve():
    assert isinstance(resolve_policy("snapkv").allocator, Uniform)
    assert isinstance(resolve_policy("pyramid:snapkv").allocator, Pyramid)
    policy = resolve_policy("adakv:critical-h2o")
    assert isinstance(policy.allocator, AdaKV) and policy.scorer.name == "critical-h2o"


def test_pyramid_shares_average_to_the_budget():
    pyramid = Pyramid(spread=0.5)
    assert pyramid.layer_factor(0, 1) == 1.0  # one full-attention layer keeps the budget
    for layers in (2, 3, 30):
        factors = [pyramid.layer_factor(d, layers) for d in range(layers)]
        assert factors[0] == 1.5 and factors[-1] == 0.5 and abs(sum(factors) / layers - 1) < 1e-9


def test_threshold_in_padded_batch_equals_rows_alone():
    model = tiny_llama()
    make = lambda: EvictionCache(model, Policy(SCORERS["knorm"](), Threshold(-0.63)), budget=None, slack=5, **PROTECT)  # noqa: E731
    rows = [prompt(40, seed=4)[0], prompt(27, seed=5)[0]]
    ids, mask = left_padded(rows)
    gen = dict(do_sample=False, max_new_tokens=12)
    batch = model.generate(ids, attention_mask=mask, **with_cache(model, make()), **gen)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones_like(r[None]), **with_cache(model, make()), **gen)
        assert torch.equal(batch[i, 40:], alone[0, len(r):]), f"row {i}"


def test_criticalkv_needs_nonnegative_scores():
    with pytest.raises(ValueError, match="non-negative"):
        resolve_policy("critical-knorm")
    assert resolve_policy("critical-h2o").scorer.observes


@pytest.mark.parametrize("share", [0.2, 0.9])  # few kept (rank the kept) / most kept (rank the dropped)
def test_topk_per_head_keeps_the_best_within_budget(share):
    g = torch.Generator().manual_seed(0)
    ranked = torch.randn(2, 3, 40, generator=g)
    ranked[torch.rand(2, 3, 40, generator=g) < 0.2] = -torch.inf  # empty slots: never kept
    ranked[torch.rand(2, 3, 40, generator=g) < 0.1] = torch.inf  # protected: kept first
    budget = torch.tensor([[int(40 * share), int(40 * share) - 3, 40], [int(40 * share) + 2, 1, 0]])
    keep = topk_per_head(ranked, budget)
    valid = ranked > -torch.inf
    assert torch.equal(keep.sum(-1), torch.minimum(budget, valid.sum(-1)))
    assert not bool((keep & ~valid).any())
    for kept, rest in zip(ranked.where(keep, torch.inf).flatten(0, 1), ranked.where(~keep & valid, -torch.inf).flatten(0, 1)):
        assert kept.min() >= rest.max()  # nothing left out beats anything kept


def test_output_norms_are_what_each_query_head_writes_through_o_proj():
    from kvevict.scoring.criticalkv import output_norms

    torch.manual_seed(0)
    kv_heads, group, dv, hidden = 2, 3, 8, 20
    w = torch.randn(hidden, kv_heads * group * dv)
    values = torch.randn(1, kv_heads, 5, dv)
    direct = torch.stack([torch.stack([(w.view(hidden, kv_heads, group, dv)[:, h, g] @ values[0, h].T).norm(dim=0)
                                       for g in range(group)]) for h in range(kv_heads)])
    assert torch.allclose(output_norms(w, values)[0], direct, atol=1e-4)
