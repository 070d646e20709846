"""Decode speed, prefill time and memory vs context length: full cache, evicting caches, a plain small cache.

    python bench/speed.py --model smollm2-135m --contexts 2048 4096 8192 --budget 512 --policies streaming learned

Each (context, cache) runs in a fresh process (so its peak RSS is its own) with one random-token
context per length (speed does not depend on the text) and one hand-written loop: ``--repeats``
prefills (the median is reported), then greedy decode; the median decode step is reported.
``plain-<budget>`` is the physical floor for decoding under a budget: a DynamicCache that only ever
saw ``budget`` tokens. Evicting caches are
prefilled in ``--chunk``-token chunks, the others in one pass. Writes ``bench/results/speed_<model>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvevict import EvictionCache, with_cache  # noqa: E402
from kvevict.evaluate import kv_bytes  # noqa: E402
from kvevict.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@torch.inference_mode()
def run(model, ids: torch.Tensor, new_cache: Callable[[], Any], chunk: int | None, steps: int, repeats: int) -> dict:
    """Prefill ``ids`` [1, n] (in chunks if given) into ``repeats`` new caches (the median time is
    reported), then decode ``steps`` tokens from the last one."""
    prefills = []
    for _ in range(repeats):
        cache = new_cache()
        start = time.perf_counter()
        for part in ids.split(chunk or ids.shape[1], dim=-1):
            logits = model(part, **with_cache(model, cache), logits_to_keep=1).logits
        prefills.append(time.perf_counter() - start)
    prefill = sorted(prefills)[len(prefills) // 2]
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = model(token, **with_cache(model, cache)).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])  # drop warm-up steps; report the median
    return {"prefill_s": round(prefill, 3), "decode_ms": round(1000 * times[len(times) // 2], 2),
            "kv_bytes": kv_bytes(cache)}


def measure(config: dict) -> dict:
    """One (context, cache) run in this process; adds the peak RSS and the RSS after loading the model."""
    torch.set_num_threads(config["threads"])
    model, _ = load_model(config["model"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n, kind, budget = config["context"], config["kind"], config["budget"]
    ids = torch.randint(100, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    if kind in ("full", "plain"):
        model.set_attn_implementation("sdpa")
        context = ids if kind == "full" else ids[:, -budget:]
        result = run(model, context, lambda: DynamicCache(config=model.config), None, config["steps"],
                     config["repeats"])
    else:
        result = run(model, ids, lambda: EvictionCache(model, kind, budget=budget), config["chunk"], config["steps"],
                     config["repeats"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = kind if kind == "full" else f"{kind}-{budget}"
    return {"model": config["model"], "context": n, "cache": name, **result, "rss_model_mb": round(loaded),
            "peak_rss_mb": round(peak)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--policies", nargs="+", default=["streaming", "learned"])
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk of the evicting caches")
    p.add_argument("--steps", type=int, default=34, help="decode steps per run (the first 2 are warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per run (the median time is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: a JSON config to measure in this process
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error(f"--steps must be at least 3 (the first 2 decode steps are warm-up), got {args.steps}")
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return []
    rows = []
    kinds = ["full", *args.policies, "plain"]
    for n, kind in tqdm([(n, k) for n in args.contexts for k in kinds], desc="speed"):
        config = dict(model=args.model, context=n, kind=kind, budget=args.budget, chunk=args.chunk, steps=args.steps,
                      repeats=args.repeats, threads=args.threads)
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], check=True, capture_output=True,
                             text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        tqdm.write(json.dumps(rows[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"speed_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    stem.with_suffix(".md").write_text(table(rows, args.policies[0]) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(table(rows, args.policies[0]))
    return rows


def table(rows: list[dict], reference: str) -> str:
    """Markdown table; prefill and decode times relative to the ``reference`` evicting cache, decode also
    to the plain cache."""
    def rel(r: dict, prefix: str, key: str = "decode_ms") -> str:
        base = [x[key] for x in rows if x["context"] == r["context"] and x["cache"].startswith(prefix)]
        return f"{r[key] / base[0]:.2f}x" if base else "-"

    ref = reference + "-"
    lines = [f"# Prefill, decode speed and memory ({rows[0]['model']}, 2-core CPU)", "",
             f"| context | cache | prefill s | vs {reference} | decode ms/token | vs plain | vs {reference} | KV MB "
             "| peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['cache']} | {r['prefill_s']} | {rel(r, ref, 'prefill_s')} | "
                     f"{r['decode_ms']} | {rel(r, 'plain-')} | {rel(r, ref)} | {r['kv_bytes'] / 2**20:.1f} | "
                     f"{r['peak_rss_mb']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Decode ms/token, KV MB and peak RSS vs context length, one line per cache."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for cache in dict.fromkeys(r["cache"] for r in rows):
        pts = [r for r in rows if r["cache"] == cache]
        x = [r["context"] for r in pts]
        for ax, key, scale in zip(axes, ("decode_ms", "kv_bytes", "peak_rss_mb"), (1, 2**-20, 1)):
            ax.plot(x, [r[key] * scale for r in pts], marker="o", label=cache)
    for ax, title in zip(axes, ("decode ms / token", "KV cache MB", "peak RSS MB")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context tokens")
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
