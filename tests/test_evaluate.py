"""Evaluation primitives: needle prompts are exact and scorable; fidelity is zero for the full cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import DynamicCache

from kvevict import EvictionCache
from kvevict.evaluate import fidelity, load_policy_table, needle_prompt, save_policy_rows, score_answer
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
