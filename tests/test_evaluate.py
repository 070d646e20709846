"""Evaluation primitives: needle prompts are exact and scorable; fidelity is zero for the full cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from kvevict import EvictionCache
from kvevict.evaluate import (fidelity, load_policy_table, needle_prompt, policy_row, save_policy_rows, score_answer,
                              window_offsets)
from kvevict.machine import hardware
from kvevict.models import load_model
from conftest import prompt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok():
    return load_model("smollm2-135m")[1]


@pytest.mark.parametrize("length, depth", [(1000, 0.0), (2048, 0.5), (3000, 1.0)])
def test_needle_prompt_is_exact_and_has_one_needle(tok, length, depth):
    p = needle_prompt(tok, length, depth, seed=3)
    assert p.context.shape == (1, length)
    text = tok.decode(p.context[0])
    value = p.answers[0]
    assert len(value) == 7 and text.count(value) == 1
    assert text.count("special magic number is") == 1
    where = text.index(value) / len(text)
    assert abs(where - depth) < 0.1
    assert tok.decode(p.question[0]).endswith("The special magic number is")


def test_needle_prompts_differ_by_seed(tok):
    assert needle_prompt(tok, 500, 0.5, seed=1).answers != needle_prompt(tok, 500, 0.5, seed=2).answers


def test_score_answer():
    assert score_answer(" 1234567.", ("1234567",)) == 1.0
    assert score_answer("ABC and d", ("abc", "D", "x")) == pytest.approx(2 / 3)
    assert score_answer("nothing", ("1234567",)) == 0.0


def test_a_policy_table_holds_one_workload(tmp_path):
    path = tmp_path / "policies.json"
    settings = {"continuation": 512, "depths": [0.3, 0.7], "chunk": 512}
    assert load_policy_table(path, settings) == []
    rows = save_policy_rows(path, [], [{"policy": "full", "budget": None, **settings},
                                       {"policy": "kvpress:SnapKVPress", "budget": 0.1, "continuation": 512,
                                        "depths": [0.3, 0.7]}])  # one-pass prefill: no chunk
    assert load_policy_table(path, settings) == rows
    for other in ({"continuation": 256}, {"depths": [0.5]}, {"chunk": 256}):
        with pytest.raises(ValueError, match="holds rows measured with"):
            load_policy_table(path, {**settings, **other})
    rows = save_policy_rows(path, rows, [{"policy": "full", "budget": None, **settings, "kl": 0.0}])
    assert len(rows) == 2 and rows[-1]["kl"] == 0.0  # the same (policy, budget) is replaced


def test_fidelity_of_full_and_evicting_cache(llama):
    ids = prompt(120)
    same = fidelity(llama, ids, 90, lambda: DynamicCache(), chunk=32)
    assert same.nll_increase == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0 and same.kl < 1e-9
    lossy = fidelity(llama, ids, 90, lambda: EvictionCache(llama, "streaming", budget=12, sinks=2, recent=4), chunk=32)
    assert lossy.kl > 0 and lossy.kv_bytes < same.kv_bytes


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_peak_rss_resets_between_runs():
    # in a fresh process: a long-lived one may reuse freed memory without its RSS growing
    script = """
from kvevict.rss import peak_rss_mb, reset_peak_rss
reset_peak_rss()
before = peak_rss_mb()
block = bytearray(64 * 2**20)
block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
during = peak_rss_mb()
del block
reset_peak_rss()
print(before, during, peak_rss_mb())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, during, after = map(float, out.split())
    assert during - before > 50
    assert after < during - 50


def test_ruler_means_cover_only_the_tasks_every_row_has(bench_script):
    ruler = bench_script("ruler")

    def row(task: str, policy: str, budget: float | None, score: float) -> dict:
        return {"length": 8, "task": task, "policy": policy, "budget": budget, "score": score}

    rows = [row("a", "full", None, 1.0), row("b", "full", None, 0.0), row("c", "full", None, 1.0),
            row("a", "snapkv", 0.1, 0.5), row("b", "snapkv", 0.1, 0.0)]
    assert ruler.common_tasks(rows) == {8: ["a", "b"]}
    table = ruler.overview(rows)
    assert "| full | 0.50 | - |" in table and "| snapkv | - | 0.25 |" in table
    rows += [row("a", "tova", 0.1, 1.0), row("b", "tova", 0.1, 1.0), row("c", "h2o", 0.1, 1.0)]  # h2o: one task only
    assert ruler.common_tasks(rows) == {8: ["a", "b"]}  # not the tasks of every row (none)
    assert ruler.complete(rows, {8: ["a", "b"]}) == {(8, "full", None), (8, "snapkv", 0.1), (8, "tova", 0.1)}
    table = ruler.overview(rows)
    assert "| snapkv | - | 0.25 |" in table and "| tova | - | 1.00 |" in table
    assert not any(line.startswith("| h2o |") for line in table)  # a row without the shared tasks has no mean


def test_ruler_summary_lands_beside_its_log(bench_script, tmp_path):
    ruler = bench_script("ruler")
    results = sorted(p.name for p in ruler.RESULTS.iterdir())
    records = [{**ruler.identity(["m", 8, task, policy, budget, 0]), "score": score, "kv_mb": 1.0, "prefill_s": 1.0,
                "decode_ms": 1.0, "peak_rss_mb": None, "elapsed_s": 1.0}
               for task, policy, budget, score in [("a", "full", None, 1.0), ("a", "snapkv", 0.1, 0.0)]]
    log = tmp_path / "ruler_m.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    ruler.summarize(log, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ruler_m.csv", "ruler_m.jsonl", "ruler_m.md", "ruler_m.png"]
    summary = (tmp_path / "ruler_m.md").read_text()
    assert "| snapkv | - | 0.00 |" in summary and f"the last run on a {hardware()})" in summary
    assert sorted(p.name for p in ruler.RESULTS.iterdir()) == results  # --out elsewhere leaves bench/results alone


def test_ruler_log_refuses_runs_under_other_settings(bench_script, tmp_path, capsys):
    """A log's finished runs are skipped by key, so a rerun with another answer length or chunk would
    silently keep their rows: refused (records before the settings were written count as 32 / 512)."""
    ruler = bench_script("ruler")
    legacy = {**ruler.identity(["m", 8, "a", "full", None, 0]), "score": 1.0}
    (tmp_path / "ruler_m.jsonl").write_text(json.dumps(legacy) + "\n")
    for argv in (["--max-new-tokens", "64"], ["--chunk", "256"]):
        with pytest.raises(SystemExit):
            ruler.main(["--model", "m", "--out", str(tmp_path), *argv])
        assert "other settings ({'max_new_tokens': 32, 'chunk': 512})" in capsys.readouterr().err


def test_ruler_refuses_a_task_whose_data_is_not_here(bench_script, tmp_path, monkeypatch, capsys):
    """QA needs Quoref, whose source left PyPI: without a cached copy it is left out of the default tasks and
    refused by name before any model is loaded."""
    monkeypatch.setenv("KVEVICT_CACHE", str(tmp_path))  # an empty cache
    ruler = bench_script("ruler")
    assert not ruler.TASKS["qa"].available() and ruler.TASKS["niah_single"].available()
    with pytest.raises(SystemExit):
        ruler.main(["--model", "no-such-model", "--tasks", "niah_single", "qa", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "task qa cannot be built here: quoref: bigbench 1.0.0" in err and "quoref_answer_generation.json" in err
    with pytest.raises(SystemExit):
        ruler.main(["--model", "no-such-model", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "default: every task whose data can be had here (common_words, frequent_words, niah_multikey," in usage
    assert "who_speaks)" in usage and " qa," not in usage


def test_hardware_names_the_machine_a_run_ran_on(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert hardware("cpu", 3) == "7-core CPU (3 threads)"
    assert hardware() == f"7-core CPU ({torch.get_num_threads()} threads)"  # torch's current setting
    assert hardware(torch.device("meta"), 2) == "meta"


def test_more_windows_cover_new_text():
    offsets = window_offsets(154_008, 16_384, 8)
    assert offsets[:3] == [50_000, 90_000, 130_000]  # the windows of the tables measured on three
    spans = sorted((o, o + 16_384) for o in offsets)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])) and spans[-1][1] <= 154_008
    with pytest.raises(ValueError, match="room for 4 windows of 32768 tokens, not 8"):
        window_offsets(154_008, 32_768, 8)


def test_paired_differences_over_windows(bench_script):
    paired = bench_script("policies").paired

    def row(policy: str, nll: list[float], kl: list[float], per_window: bool = True) -> dict:
        fid = [{"nll_full": 1.0, "nll": 1.0 + x, "top1_agreement": 0.9, "kl": k, "prefill_s": 1.0, "kv_bytes": 1}
               for x, k in zip(nll, kl)]
        r = policy_row("m", 8, policy, 0.1, fid, [1.0])
        return r if per_window else {k: v for k, v in r.items() if k != "per_document"}

    lines = paired([row("a", [0.1, 0.2, 0.3], [0.1, 0.1, 0.1]), row("b", [0.2, 0.2, 0.5], [0.3, 0.2, 0.4]),
                    row("old", [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], per_window=False),
                    row("c", [0.0, 0.1], [0.05, 0.05]), row("d", [0.1, 0.1], [0.1, 0.2])])
    assert lines[-1] == ("| 10% | a | b | -0.1000 ± 0.0577 (2/3) | +0.0000 ± 0.0000 (0/3) | "
                         "-0.2000 ± 0.0577 (3/3) |")
    assert not any("old" in line for line in lines)  # a row without per-window values is not compared
    # rows on 2 windows (c has the lowest KL of all) are compared among themselves, not with a or b
    assert [line.split(" | ")[1:3] for line in lines if line.startswith("| 10%")] == [["c", "d"], ["a", "b"]]


def test_speed_pairs_the_caches_round_by_round(llama, bench_script, monkeypatch):
    speed = bench_script("speed")
    # one slow round (the machine busy elsewhere) moves the ratio of medians, not the median of ratios
    times, reference = [1.1, 1.1, 5.5, 5.5, 5.5], [1.0, 1.0, 1.0, 5.0, 5.0]
    assert speed.paired_ratio(times, reference) == pytest.approx(1.1)
    assert speed.median(times) / speed.median(reference) == pytest.approx(5.5)
    with pytest.raises(ValueError):
        speed.paired_ratio([1.0, 2.0], [1.0])

    made, kinds, stepped = [], {}, []
    step = speed.step

    def logged_step(model, token, cache):
        stepped.append((kinds[id(cache)], token.item()))
        return step(model, token, cache)

    def new_cache(kind: str):
        def make():
            made.append(kind)
            cache = EvictionCache(llama, kind, budget=48)
            kinds[id(cache)] = kind
            return cache
        return make

    monkeypatch.setattr(speed, "step", logged_step)
    ids = prompt(80)
    times, _ = speed.interleave(llama, ids, {"streaming": new_cache("streaming"), "h2o": new_cache("h2o")},
                                chunk=32, steps=5, repeats=3)
    assert made == ["streaming", "h2o", "h2o", "streaming", "streaming", "h2o"]  # the prefill order rotates
    assert [kind for kind, _ in stepped] == ["streaming", "h2o", "h2o", "streaming", "streaming", "h2o",
                                             "h2o", "streaming", "streaming", "h2o"]  # so does the decode order
    assert {k: [len(v) for v in t.values()] for k, t in times.items()} == {"streaming": [3, 3], "h2o": [3, 3]}
    # each cache decodes its own greedy continuation, as one cache alone would
    for kind in ("streaming", "h2o"):
        cache = EvictionCache(llama, kind, budget=48)
        token, _ = speed.prefill(llama, ids, cache, 32)
        alone = []
        for _ in range(5):
            alone.append(token.item())
            token, _ = step(llama, token, cache)
        assert [t for k, t in stepped if k == kind] == alone


def test_kvpress_runner_continues_a_hybrid_model_with_one_mask_per_layer_type(gemma, bench_script):
    runner = bench_script("kvpress_runner")
    ids = prompt(40)
    with torch.inference_mode():
        cache, _, _ = runner.compressed(gemma, ids[:, :30], None)
        whole = gemma(ids).logits[:, 30:]
        torch.testing.assert_close(runner.extend(gemma, cache, ids[:, 30:], 30).logits, whole)

        def evicted() -> DynamicCache:  # what a press leaves: the full-attention layer keeps 4 sinks + 8 recent
            cache, _, _ = runner.compressed(gemma, ids[:, :30], None)
            full = cache.layers[cache.is_sliding.index(False)]
            keep = torch.cat([torch.arange(4), torch.arange(22, 30)])
            full.keys, full.values = full.keys[:, :, keep], full.values[:, :, keep]
            return cache

        block = runner.extend(gemma, evicted(), ids[:, 30:], 30).logits
        cache = evicted()
        steps = torch.cat([runner.extend(gemma, cache, ids[:, i:i + 1], i).logits for i in range(30, 40)], 1)
    torch.testing.assert_close(block, steps)  # causal in every layer type: no query sees a later token
    assert not torch.allclose(block, whole)  # the eviction is seen


def test_kvpress_answers_time_each_forward_pass_as_kvevicts_do(bench_script, monkeypatch):
    """kvevict's ms/token counts the end token (a forward pass made it); kvpress's side counts passes too."""
    runner = bench_script("kvpress_runner")
    chosen = iter([5, 6, 2])  # the question's pass, two decode passes; the third pass's token is the end token
    calls = []

    def extend(model, cache, ids, seen, logits_to_keep=0):
        calls.append(ids.shape[1])
        logits = torch.zeros(1, ids.shape[1], 8)
        logits[0, -1, next(chosen)] = 1.0
        return type("Out", (), {"logits": logits})

    monkeypatch.setattr(runner, "extend", extend)
    clock = iter([0.0, 3.0])
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    tokens, ms = runner.greedy(None, None, torch.zeros(1, 4, dtype=torch.long), 10, 16, {2})
    assert tokens == [5, 6] and calls == [4, 1, 1] and ms == pytest.approx(1000.0)


def test_prefill_overhead_only_against_a_full_cache_prefilled_alike(bench_script):
    overhead = bench_script("policies").overhead
    full = {"prefill_s": 10.0, "chunk": 512}
    assert overhead({"prefill_s": 12.5, "chunk": 512}, full) == "1.25x"
    assert overhead({"prefill_s": 5.0}, full) == "-"  # kvpress's one-pass prefill records no chunk
