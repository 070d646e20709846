"""Evaluation primitives shared by the benchmarks: needle prompts, query-agnostic runs, fidelity.

Protocol (query-agnostic): the context is prefilled in chunks into the cache, which evicts as it
goes; then eviction is paused and the question (and answer) are appended. No policy ever sees the
question while it decides what to keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .cache import EvictionCache
from .compat import with_cache
from .data import essays_text
from .gates import load_gates
from .policy import resolve_policy
from .rss import peak_rss_mb, reset_peak_rss
from .scoring.learned import LearnedRetention

PLACEHOLDER = "@@CONTENT@@"


@dataclass(frozen=True)
class Prompt:
    """A task prompt split into the part a cache may compress and the part it must not see first."""

    context: torch.Tensor  # [1, n] token ids
    question: torch.Tensor  # [1, m] token ids (question, end of turn, answer prefix)
    answers: tuple[str, ...]


def chat_frame(tok: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text before and after a user message (chat template, or a plain frame for base models)."""
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True,
                                       tokenize=False)
        head, tail = text.split(PLACEHOLDER)
        return head, tail
    return (tok.bos_token or ""), "\n"


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def haystack_ids(tok: PreTrainedTokenizerBase, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of essay text starting at token ``offset`` (wrapping around)."""
    ids = _essay_ids(tok)
    if n > len(ids):
        raise ValueError(f"the essays hold {len(ids)} tokens; {n} were asked for")
    start = offset % len(ids)
    return (ids + ids)[start : start + n]


_ESSAY_IDS: dict[str, list[int]] = {}


def _essay_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    key = f"{type(tok).__name__}:{tok.name_or_path}:{len(tok)}"
    if key not in _ESSAY_IDS:
        _ESSAY_IDS[key] = encode(tok, essays_text())
    return _ESSAY_IDS[key]


def sentence_boundary(tok: PreTrainedTokenizerBase, ids: list[int], index: int) -> int:
    """The first index at or after ``index`` that starts a sentence (follows a token ending in '.')."""
    tokens = tok.convert_ids_to_tokens(ids)
    for i in range(max(index, 1), len(ids)):
        if tokens[i - 1].rstrip().endswith(".") and not tokens[i].startswith("."):
            return i
    return index


def needle_prompt(tok: PreTrainedTokenizerBase, length: int, depth: float, seed: int) -> Prompt:
    """Single needle (a 7-digit number) at ``depth`` in an essay haystack; the context is exactly
    ``length`` tokens (chat frame included)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = random.Random(seed)
    value = str(rng.randrange(10**6, 10**7))
    head, tail = chat_frame(tok)
    intro = encode(tok, head + "Read the text below and remember the special magic number hidden in it.\n\n")
    needle = encode(tok, f" The special magic number is {value}.")
    n_hay = length - len(intro) - len(needle)
    if n_hay <= 0:
        raise ValueError(f"length {length} leaves no room for a haystack")
    hay = haystack_ids(tok, n_hay, offset=rng.randrange(10**6))
    at = sentence_boundary(tok, hay, int(depth * n_hay)) if depth < 1 else n_hay
    context = intro + hay[:at] + needle + hay[at:]
    question = encode(tok, "\n\nWhat is the special magic number mentioned in the text?" + tail
                      + "The special magic number is")
    return Prompt(torch.tensor([context]), torch.tensor([question]), (value,))


@dataclass(frozen=True)
class Workload:
    """What a policy comparison runs on, the same token ids for every runtime: essay windows
    ``[1, length]`` whose last tokens after ``prefix`` are scored for fidelity, and needle prompts."""

    documents: list[torch.Tensor]
    prefix: int
    needles: list[Prompt]


FIRST_WINDOWS = (50_000, 90_000, 130_000)  # token offsets of the first essay windows (of every table so far)


def window_offsets(total: int, length: int, documents: int) -> list[int]:
    """Start tokens of ``documents`` windows of ``length`` tokens in a text of ``total`` tokens: the first
    ones at :data:`FIRST_WINDOWS` (wrapping around), each other one centred in the widest stretch of text
    no window covers yet, so that more windows add independent text from all over it. Raises if the
    text has no room for that many."""
    offsets = [o % total for o in FIRST_WINDOWS[:documents]]
    while len(offsets) < documents:
        covered = sorted([(o, min(o + length, total)) for o in offsets]
                         + [(0, o + length - total) for o in offsets if o + length > total])  # wrapped windows
        gaps, end = [], 0
        for start, stop in covered:
            gaps.append((end, start))
            end = max(end, stop)
        lo, hi = max(gaps + [(end, total)], key=lambda g: g[1] - g[0])
        if hi - lo < length:
            raise ValueError(f"the essays hold {total} tokens: room for {len(offsets)} windows of {length} tokens, "
                             f"not {documents} (more would overlap others)")
        offsets.append((lo + hi - length) // 2)
    return offsets


def policy_workload(tok: PreTrainedTokenizerBase, length: int, continuation: int, documents: int,
                    depths: list[float]) -> Workload:
    """The windows (:func:`window_offsets` of the essays) and needles (one seed per depth) of
    ``bench/policies.py``."""
    offsets = window_offsets(len(_essay_ids(tok)), length, documents)
    docs = [torch.tensor([haystack_ids(tok, length, offset=o)]) for o in offsets]
    needles = [needle_prompt(tok, length, depth, seed=i) for i, depth in enumerate(depths)]
    return Workload(docs, length - continuation, needles)


def policy_row(model: str, length: int, policy: str, budget: float | None, fidelity: list[dict],
               hits: list[float]) -> dict:
    """One row of the policy tables: ``fidelity`` per document (dicts with the fields of :class:`Fidelity`)
    averaged, and the needle score averaged over ``hits``."""
    n = len(fidelity)

    def mean(key: str) -> float:
        return sum(f[key] for f in fidelity) / n

    return {
        "model": model, "length": length, "policy": policy, "budget": budget, "documents": n,
        "nll_full": mean("nll_full"), "nll_increase": mean("nll") - mean("nll_full"),
        "top1_agreement": mean("top1_agreement"), "kl": mean("kl"),
        "needle": sum(hits) / len(hits), "needle_samples": len(hits),
        "prefill_s": mean("prefill_s"), "kv_mb": mean("kv_bytes") / 2**20,
        "per_document": {"nll_increase": [f["nll"] - f["nll_full"] for f in fidelity],
                         "top1_agreement": [f["top1_agreement"] for f in fidelity], "kl": [f["kl"] for f in fidelity]},
    }


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``minimum``, else a usage error naming the bound."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value
    return parse


def check_policy_names(names: list[str], config) -> None:
    """Resolve every policy name (``"full"``: the full cache) before any work, so a typo fails at once."""
    for name in names:
        if name != "full":
            resolve_policy(name, config)


def policy_cards(names: list[str], config) -> dict[str, str]:
    """For each learned policy name, a digest of the calibrated gates and card it loads (by name they
    come from ``$KVEVICT_POLICIES`` or ``policies/``, so the same name may mean other gates later)."""
    if not any(LearnedRetention.name in name for name in names):
        return {}
    gates, card = load_gates(config)
    digest = hashlib.sha256(json.dumps(asdict(card), sort_keys=True, default=str).encode())
    for _, weights in sorted(gates.state_dict().items()):
        digest.update(weights.detach().cpu().numpy().tobytes())
    return {name: digest.hexdigest()[:12] for name in names if LearnedRetention.name in name}


def check_cards(rows: list[dict], cards: dict[str, str], where: Path) -> None:
    """Refuse results in ``where`` measured for a policy name with other gates than it loads now
    (``cards``: :func:`policy_cards`); rows written before they named their gates are taken as they are."""
    for r in rows:
        if r.get("card") not in (None, cards.get(r["policy"], r.get("card"))):
            raise ValueError(f"{where} holds {r['policy']!r} rows measured with other calibrated gates (card "
                             f"{r['card']}, now {cards[r['policy']]}): rename those rows, or write elsewhere (--out)")


def workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options shared by the policy benchmarks (model, lengths, budgets, samples)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=at_least(64), default=4096)
    parser.add_argument("--continuation", type=at_least(2), default=512)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--documents", type=at_least(1), default=2)
    parser.add_argument("--threads", type=at_least(1), default=2)


def table_settings(args: argparse.Namespace) -> dict:
    """The workload settings every row of one policy table shares (its header describes them)."""
    return {"continuation": args.continuation, "depths": list(args.depths)}


def load_policy_table(path: Path, settings: dict) -> list[dict]:
    """The rows of a policy results file (``[]`` if none). Raises if a row records a setting of
    ``settings`` with another value: one table describes one workload."""
    rows = json.loads(path.read_text()) if path.exists() else []
    for r in rows:
        theirs = {k: r[k] for k in settings if k in r}
        if theirs != {k: settings[k] for k in theirs}:
            raise ValueError(f"{path} holds rows measured with {theirs} ({r['policy']}), not {settings}: "
                             "rerun with those settings or write elsewhere (--out)")
    return rows


def save_policy_rows(path: Path, rows: list[dict], new: list[dict]) -> list[dict]:
    """Write ``rows`` with ``new`` in place of the rows of the same (policy, budget); return them."""
    keys = {(r["policy"], r["budget"]) for r in new}
    rows = [r for r in rows if (r["policy"], r["budget"]) not in keys] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def score_answer(output: str, answers: tuple[str, ...]) -> float:
    """RULER-style: the fraction of references found in the output (case-insensitive substring)."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def kv_bytes(cache) -> int:
    """Bytes a cache holds: an EvictionCache's entries (with positions), or a plain cache's tensors."""
    if isinstance(cache, EvictionCache):
        return cache.stats()["bytes"]
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "is_initialized", False))


@torch.inference_mode()
def prefill(model: PreTrainedModel, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed ``ids`` ``[1, n]`` into ``cache`` in chunks (logits only for the last token of each); the
    logits ``[1, 1, vocab]`` after the last token."""
    for part in ids.split(chunk, dim=-1):
        logits = model(part, **with_cache(model, cache), logits_to_keep=1).logits
    return logits


@dataclass(frozen=True)
class Answer:
    """A generated answer with what producing it cost."""

    text: str
    prefill_s: float  # compressing the context
    kv_bytes: int  # held after compressing the context
    decode_ms: float  # per generated token (question prefill included)
    peak_rss_mb: float | None  # the process's peak resident memory during this answer (model weights included)


def answer(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: Prompt, cache, chunk: int = 512,
           max_new_tokens: int = 16) -> Answer:
    """Query-agnostic answer: compress the context, then append the question with eviction paused."""
    reset_peak_rss()
    start = time.perf_counter()
    prefill(model, prompt.context, cache, chunk)
    seconds = time.perf_counter() - start
    held = kv_bytes(cache)
    if isinstance(cache, EvictionCache):
        cache.pause_eviction(True)
    ids = torch.cat([prompt.context, prompt.question], dim=-1)
    start = time.perf_counter()
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad)
    new = out[0, ids.shape[1]:]
    decode_ms = 1000 * (time.perf_counter() - start) / max(len(new), 1)  # a forward pass per token, an end token too
    return Answer(tok.decode(new, skip_special_tokens=True), seconds, held, decode_ms, peak_rss_mb())


@dataclass(frozen=True)
class Fidelity:
    """Continuation metrics of a compressed cache against the full cache (nats / fractions)."""

    nll_full: float
    nll: float
    top1_agreement: float
    kl: float
    prefill_s: float
    kv_bytes: int  # held after compressing the prefix

    @property
    def nll_increase(self) -> float:
        return self.nll - self.nll_full


def token_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` ``[..., T]`` from log-probabilities ``[..., T, V]``."""
    return (teacher.exp() * (teacher - student)).sum(-1)


@torch.inference_mode()
def continuation_logits(model: PreTrainedModel, ids: torch.Tensor, prefix: int, cache, chunk: int
                        ) -> tuple[torch.Tensor, float, int]:
    """Prefill ``ids[:, :prefix]`` in chunks into ``cache``, then logits ``[n - prefix, V]`` of the rest.

    Also returns the prefill time (s) and the bytes held after it."""
    start = time.perf_counter()
    prefill(model, ids[:, :prefix], cache, chunk)
    seconds = time.perf_counter() - start
    held = kv_bytes(cache)
    if isinstance(cache, EvictionCache):
        cache.pause_eviction(True)
    return model(ids[:, prefix:], **with_cache(model, cache)).logits[0].float(), seconds, held


def fidelity(model: PreTrainedModel, ids: torch.Tensor, prefix: int, make_cache: Callable[[], object],
             reference: torch.Tensor | None = None, chunk: int = 512) -> Fidelity:
    """Compress ``ids[:, :prefix]`` with ``make_cache()``; compare next-token predictions on the rest
    with the full cache (``reference`` logits, computed if not given)."""
    if reference is None:
        reference = continuation_logits(model, ids, prefix, DynamicCache(config=model.config), chunk)[0]
    logits, seconds, held = continuation_logits(model, ids, prefix, make_cache(), chunk)
    nll_full, nll, agree, kl = compare_continuations(reference, logits, ids[0, prefix + 1 :])
    return Fidelity(nll_full, nll, agree, kl.mean().item(), seconds, held)


def compare_continuations(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[float, float, float, torch.Tensor]:
    """Continuation logits ``[n, V]`` of a compressed cache against the full cache's ``reference``, on
    the next tokens ``targets`` ``[n - 1]``: mean NLL of each, top-1 agreement, per-token KL ``[n - 1]``."""
    ref_lp, lp = reference[:-1].log_softmax(-1), logits[:-1].log_softmax(-1)
    nll_full = -ref_lp.gather(-1, targets[:, None]).mean().item()
    nll = -lp.gather(-1, targets[:, None]).mean().item()
    agree = (ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()
    return nll_full, nll, agree, token_kl(ref_lp, lp)
