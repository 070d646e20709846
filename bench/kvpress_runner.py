"""Runs NVIDIA kvpress presses on token ids prepared by ``bench/kvpress_side.py``.

Executed INSIDE kvpress's own environment (kvpress 0.5.5 pins transformers < 5.3), so it imports
neither kvevict nor anything newer: it reads a JSON job (model directory, presses, ratios, fidelity
documents, prompts) and writes, per press and budget, the raw fidelity numbers of each document and
the answer (text and costs) to each prompt; kvevict's side aggregates and scores them.
kvpress compresses only during the first prefill of an empty cache, so each context is prefilled in
one forward pass under the press; the question / continuation follows without compression.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

_spec = importlib.util.spec_from_file_location("rss", Path(__file__).resolve().parent.parent / "kvevict" / "rss.py")
rss = importlib.util.module_from_spec(_spec)  # standard library only; kvevict itself is not installed here
_spec.loader.exec_module(rss)


def held_bytes(cache) -> int:
    """Bytes the cache's key/value tensors really hold (masked presses keep every entry)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def make_press(name: str, ratio: float):
    if name.startswith("AdaKV:"):
        return kvpress.AdaKVPress(make_press(name.split(":", 1)[1], ratio))
    return getattr(kvpress, name)(compression_ratio=ratio)


@torch.inference_mode()
def compressed(model, ids: torch.Tensor, press) -> tuple[DynamicCache, float, int]:
    cache = DynamicCache()
    start = time.perf_counter()
    if press is None:
        model(ids, past_key_values=cache, logits_to_keep=1)
    else:
        with press(model):
            model(ids, past_key_values=cache, logits_to_keep=1)
    return cache, time.perf_counter() - start, held_bytes(cache)


def positions(start: int, n: int) -> torch.Tensor:
    """Explicit RoPE positions: a compressed DynamicCache's length is no longer the tokens seen
    (kvpress's own pipeline passes them the same way)."""
    return torch.arange(start, start + n)[None]


@torch.inference_mode()
def greedy(model, cache, ids: torch.Tensor, seen: int, new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy answer after the question ``ids``; returns the tokens (up to an end token, excluded) and
    ms per generated token, question prefill included (as kvevict's ``answer``)."""
    start = time.perf_counter()
    out = []
    logits = model(ids, past_key_values=cache, position_ids=positions(seen, ids.shape[1]), logits_to_keep=1).logits
    seen += ids.shape[1]
    for step in range(new_tokens):
        token = logits[:, -1:].argmax(-1)
        if int(token) in eos:
            break
        out.append(int(token))
        if step + 1 < new_tokens:
            logits = model(token, past_key_values=cache, position_ids=positions(seen, 1)).logits
            seen += 1
    return out, 1000 * (time.perf_counter() - start) / max(len(out), 1)


@torch.inference_mode()
def fidelity(model, ids: torch.Tensor, prefix: int, ref: torch.Tensor, press) -> dict:
    cache, seconds, held = compressed(model, ids[:, :prefix], press)
    rest = ids[:, prefix:]
    logits = model(rest, past_key_values=cache, position_ids=positions(prefix, rest.shape[1])).logits
    lp = logits[0].float().log_softmax(-1)
    target = ids[0, prefix + 1 :]
    return {
        "nll_full": -ref[:-1].gather(-1, target[:, None]).mean().item(),
        "nll": -lp[:-1].gather(-1, target[:, None]).mean().item(),
        "top1_agreement": (ref[:-1].argmax(-1) == lp[:-1].argmax(-1)).float().mean().item(),
        "kl": (ref[:-1].exp() * (ref[:-1] - lp[:-1])).sum(-1).mean().item(),
        "prefill_s": seconds, "kv_bytes": held,
    }


def answer(model, tok, prompt: dict, press, max_new_tokens: int, eos: set[int]) -> dict:
    """Compress the context with ``press``, answer the question greedily; the text and its costs."""
    context = torch.tensor([prompt["context"]])
    rss.reset_peak_rss()
    start = time.perf_counter()
    cache, seconds, held = compressed(model, context, press)
    tokens, decode_ms = greedy(model, cache, torch.tensor([prompt["question"]]), context.shape[1], max_new_tokens, eos)
    return {"text": tok.decode(tokens, skip_special_tokens=True), "prefill_s": seconds, "kv_bytes": held,
            "decode_ms": decode_ms, "seconds": time.perf_counter() - start, "peak_rss_mb": rss.peak_rss_mb()}


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    eos = set(job["eos_token_ids"])
    docs = [(torch.tensor([d["ids"]]), d["prefix"]) for d in job["fidelity"]]
    refs = []
    for ids, prefix in docs:
        cache, _, _ = compressed(model, ids[:, :prefix], None)
        with torch.inference_mode():
            rest = ids[:, prefix:]
            logits = model(rest, past_key_values=cache, position_ids=positions(prefix, rest.shape[1])).logits
            refs.append(logits[0].float().log_softmax(-1))
    rows = []
    for name in job["presses"]:
        for budget in job["budgets"]:
            press = make_press(name, 1.0 - budget)
            try:
                fid = [fidelity(model, ids, prefix, ref, press) for (ids, prefix), ref in zip(docs, refs)]
                answers = [answer(model, tok, prompt, press, job["max_new_tokens"], eos) for prompt in job["prompts"]]
            except Exception as e:  # a press that fails on this model is reported, not fatal to the others
                rows.append({"press": name, "budget": budget, "error": f"{type(e).__name__}: {e}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append({"press": name, "budget": budget, "fidelity": fid, "answers": answers})
            print(json.dumps({"press": name, "budget": budget}), flush=True)
    open(out_path, "w").write(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:3])
