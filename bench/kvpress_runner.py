"""Runs NVIDIA kvpress presses on token ids prepared by ``bench/kvpress_side.py``.

Executed INSIDE kvpress's own environment (kvpress 0.5.5 pins transformers < 5.3), so it imports
neither kvevict nor anything newer: it reads a JSON job (model directory, presses, ratios, fidelity
documents, needle prompts) and writes JSON rows with the same metrics as ``bench/policies.py``.
kvpress compresses only during the first prefill of an empty cache, so each context is prefilled in
one forward pass under the press; the question / continuation follows without compression.
"""

from __future__ import annotations

import json
import sys
import time

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


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
        model(ids, past_key_values=cache)
    else:
        with press(model):
            model(ids, past_key_values=cache)
    return cache, time.perf_counter() - start, held_bytes(cache)


def positions(start: int, n: int) -> torch.Tensor:
    """Explicit RoPE positions: a compressed DynamicCache's length is no longer the tokens seen
    (kvpress's own pipeline passes them the same way)."""
    return torch.arange(start, start + n)[None]


@torch.inference_mode()
def greedy(model, cache, ids: torch.Tensor, seen: int, new_tokens: int) -> list[int]:
    out = []
    logits = model(ids, past_key_values=cache, position_ids=positions(seen, ids.shape[1])).logits
    seen += ids.shape[1]
    for _ in range(new_tokens):
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
        logits = model(token, past_key_values=cache, position_ids=positions(seen, 1)).logits
        seen += 1
    return out


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
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
            fid = []
            for (ids, prefix), ref in zip(docs, refs):
                cache, seconds, held = compressed(model, ids[:, :prefix], press)
                rest = ids[:, prefix:]
                with torch.inference_mode():
                    logits = model(rest, past_key_values=cache, position_ids=positions(prefix, rest.shape[1])).logits
                lp = logits[0].float().log_softmax(-1)
                target = ids[0, prefix + 1 :]
                fid.append({
                    "nll_full": -ref[:-1].gather(-1, target[:, None]).mean().item(),
                    "nll": -lp[:-1].gather(-1, target[:, None]).mean().item(),
                    "top1": (ref[:-1].argmax(-1) == lp[:-1].argmax(-1)).float().mean().item(),
                    "kl": (ref[:-1].exp() * (ref[:-1] - lp[:-1])).sum(-1).mean().item(),
                    "seconds": seconds, "bytes": held,
                })
            hits = []
            for needle in job["needles"]:
                context = torch.tensor([needle["context"]])
                cache, _, _ = compressed(model, context, press)
                tokens = greedy(model, cache, torch.tensor([needle["question"]]), context.shape[1], job["max_new_tokens"])
                text = tok.decode(tokens)
                hits.append(sum(a.lower() in text.lower() for a in needle["answers"]) / len(needle["answers"]))
            n = len(fid)
            rows.append({
                "model": job["model"], "length": job["length"], "policy": f"kvpress:{name}", "budget": budget,
                "nll_full": sum(f["nll_full"] for f in fid) / n,
                "nll_increase": sum(f["nll"] - f["nll_full"] for f in fid) / n,
                "top1_agreement": sum(f["top1"] for f in fid) / n, "kl": sum(f["kl"] for f in fid) / n,
                "needle": sum(hits) / len(hits), "needle_samples": len(hits),
                "prefill_s": sum(f["seconds"] for f in fid) / n, "kv_mb": sum(f["bytes"] for f in fid) / n / 2**20,
            })
            print(json.dumps(rows[-1]), flush=True)
    open(out_path, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
