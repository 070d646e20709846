"""Task generators: exact lengths, each needle present once, answers recoverable from the text."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

from kvevict import tasks
from kvevict.data import QUOREF, available
from kvevict.evaluate import score_answer
from kvevict.models import load_model
from kvevict.tasks import TASKS, _qa_records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok():
    return load_model("smollm2-135m")[1]


def _made_up_quoref() -> tuple[list[tuple[str, str, tuple[str, ...]]], list[str]]:
    """Quoref-shaped records: 40 passages of 60-200 words, each with one question on a name it holds once."""
    rng = random.Random(0)
    filler = "the river ran past an old mill where people met to trade grain and tell stories".split()
    records = []
    for i in range(40):
        name = f"Quillon{i:02d}"
        words = [rng.choice(filler) for _ in range(rng.randrange(60, 200))]
        words.insert(rng.randrange(len(words)), f"{name} owned the mill number {i}")
        records.append((" ".join(words) + ".", f"Who owned the mill number {i}?", (name,)))
    return records, sorted({p for p, _, _ in records})


@pytest.fixture(autouse=True)
def made_up_quoref(monkeypatch: pytest.MonkeyPatch) -> None:
    """QA over made-up passages: Quoref's source was withdrawn from PyPI (tests with it follow, where cached)."""
    records = _made_up_quoref()
    monkeypatch.setattr(tasks, "_qa_records", lambda: records)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 2048])
def test_exact_length_and_answers_present(tok, name, length):
    prompt = TASKS[name].build(tok, length, seed=7)
    assert prompt.context.shape == (1, length)
    text = tok.decode(prompt.context[0])
    assert prompt.answers and all(a.lower() in text.lower() for a in prompt.answers)
    assert score_answer(" ".join(prompt.answers), prompt.answers) == 1.0
    assert score_answer("none of it", prompt.answers) == 0.0


@pytest.mark.parametrize("name", [n for n in TASKS if n.startswith("niah")])
def test_each_needle_once(tok, name):
    prompt = TASKS[name].build(tok, 2048, seed=3)
    text = tok.decode(prompt.context[0])
    needles = re.findall(r"special magic numbers for ([a-z-]+) is: (\d{7})", text)
    assert needles and all(text.count(value) == 1 for _, value in needles)
    question = tok.decode(prompt.question[0])
    asked = {k for k, _ in needles if k in question}
    assert set(prompt.answers) == {v for k, v in needles if k in asked}


def test_variable_chain(tok):
    prompt = TASKS["variable_tracking"].build(tok, 1500, seed=1)
    text = tok.decode(prompt.context[0])
    assert len(prompt.answers) == 5
    assert all(text.count(f"VAR {name} =") == 1 for name in prompt.answers)


def test_seeds_change_the_sample(tok):
    a = TASKS["niah_multikey"].build(tok, 1024, seed=1)
    b = TASKS["niah_multikey"].build(tok, 1024, seed=2)
    assert a.answers != b.answers
    assert TASKS["niah_multikey"].build(tok, 1024, seed=1).answers == a.answers


def test_qa_hides_the_answering_passage_once_among_distractors(tok):
    prompt = TASKS["qa"].build(tok, 2048, seed=3)
    text = tok.decode(prompt.context[0])
    documents = re.findall(r"Document (\d+):\n", text)
    assert len(documents) >= 2 and documents == [str(i + 1) for i in range(len(documents))]
    records, _ = tasks._qa_records()
    gold = [p for p, q, a in records if q in tok.decode(prompt.question[0]) and a == prompt.answers]
    assert len(gold) == 1 and text.count(gold[0]) == 1
    assert sum(p in text for p, _, _ in records) == len(documents)  # the other documents are distractors


@pytest.mark.skipif(not available(QUOREF), reason="Quoref's source (bigbench 1.0.0) was withdrawn from PyPI "
                    "and no copy is cached here")
def test_qa_on_quoref(tok, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tasks, "_qa_records", _qa_records)
    prompt = TASKS["qa"].build(tok, 2048, seed=7)
    assert prompt.context.shape == (1, 2048)
    text = tok.decode(prompt.context[0]).lower()
    assert any(a.lower() in text for a in prompt.answers)


@pytest.mark.parametrize("name, length, message", [("qa", 40, "too short for qa"),
                                                   ("who_speaks", 5, "who_speaks needs a length"),
                                                   ("who_speaks", 10**7, "who_speaks needs a length")])
def test_lengths_a_task_cannot_build_are_refused(tok, name, length, message):
    with pytest.raises(ValueError, match=message):
        TASKS[name].build(tok, length, seed=0)


def test_keys_are_the_same_in_every_process():
    """Needle keys come from a set: their order must not follow the process's string hashing, or a resumed
    run (or kvpress's side, added later) would build other prompts for the same seed."""
    code = "import random; from kvevict.tasks import _keys; print(_keys(random.Random(0), 6))"
    outputs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)},
                              capture_output=True, text=True, check=True).stdout for h in (1, 2)}
    assert len(outputs) == 1 and outputs.pop().count("-") == 6
