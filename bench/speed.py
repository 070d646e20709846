"""Decode speed and KV memory: full cache vs an evicting cache vs a plain cache holding `budget` tokens.

    python bench/speed.py --model smollm2-135m --contexts 2048 4096 8192 --budget 512

The three runs share one model, one random-token context per length (speed does not depend on the
text) and one hand-written loop (prefill, then greedy decode). "plain-<budget>" is the physical
floor for decoding under a budget: a DynamicCache that only ever saw `budget` tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from kvevict import EvictionCache
from kvevict.evaluate import kv_bytes
from kvevict.models import load_model


@torch.inference_mode()
def run(model, ids: torch.Tensor, cache, chunk: int | None, steps: int) -> dict:
    """Prefill ``ids`` [1, n] (in chunks if given), then decode ``steps`` tokens; time both."""
    start = time.perf_counter()
    for part in ids.split(chunk or ids.shape[1], dim=-1):
        logits = model(part, past_key_values=cache).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])  # drop warm-up steps; report the median
    return {"prefill_s": round(prefill, 3), "decode_ms": round(1000 * times[len(times) // 2], 2),
            "kv_bytes": kv_bytes(cache)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--policy", default="streaming")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk of the evicting cache")
    p.add_argument("--steps", type=int, default=34, help="decode steps per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    vocab = model.config.vocab_size
    rows = []
    runs = [(n, kind) for n in args.contexts for kind in ("full", "kvevict", "plain")]
    for n, kind in tqdm(runs, desc="speed"):
        ids = torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        if kind == "kvevict":
            cache = EvictionCache(model, args.policy, budget=args.budget)
            result = run(model, ids, cache, args.chunk, args.steps)
        else:
            model.set_attn_implementation("sdpa")
            context = ids if kind == "full" else ids[:, -args.budget:]
            result = run(model, context, DynamicCache(config=model.config), None, args.steps)
        name = {"full": "full", "kvevict": f"{args.policy}-{args.budget}", "plain": f"plain-{args.budget}"}[kind]
        rows.append({"model": args.model, "context": n, "cache": name, **result})
        tqdm.write(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with decode time relative to the plain cache of the same context."""
    plain = {r["context"]: r["decode_ms"] for r in rows if r["cache"].startswith("plain")}
    lines = ["| context | cache | prefill s | decode ms/token | vs plain | KV MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['decode_ms'] / plain[r['context']]:.2f}x" if r["context"] in plain else "-"
        lines.append(f"| {r['context']} | {r['cache']} | {r['prefill_s']} | {r['decode_ms']} | {rel} | "
                     f"{r['kv_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
