"""Decode speed, prefill time and memory vs context length: full cache, evicting caches, a plain small cache.

    python bench/speed.py --model smollm2-135m --contexts 2048 4096 8192 --budget 512 --policies streaming learned

Each (context, cache) runs in a fresh process (so its peak RSS is its own) with one random-token
context per length (speed does not depend on the text) and one hand-written loop: ``--repeats``
prefills (the median is reported), then greedy decode; the median decode step is reported.
``plain-<budget>`` is the physical floor for decoding under a budget: a DynamicCache that only ever
saw ``budget`` tokens. Evicting caches are
prefilled in ``--chunk``-token chunks, the others in one pass. Writes ``bench/results/speed_<model>.{json,md,png}``.

``--paired`` measures the evicting caches' cost against the first of ``--policies`` on a shared machine:
per context one process runs them interleaved (each round prefills every cache once, then each decode
round takes one step of each cache; the order rotates from round to round) and reports the median of
the per-round ratios, so a slow spell of the machine slows both sides of a ratio. No prefill is
untimed: the first round's first cache also pays the process's first forward pass, which the median
over rounds absorbs. Writes ``speed_<model>_paired.{json,md}``.
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
from kvevict.evaluate import kv_bytes, prefill as chunked_prefill  # noqa: E402
from kvevict.machine import hardware  # noqa: E402
from kvevict.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WARMUP = 2  # decode steps not timed into the medians


def prefill(model, ids: torch.Tensor, cache: Any, chunk: int | None) -> tuple[torch.Tensor, float]:
    """Prefill ``ids`` [1, n] into ``cache`` (in ``chunk``-token pieces if given); the next greedy token
    [1, 1] and the seconds it took."""
    start = time.perf_counter()
    logits = chunked_prefill(model, ids, cache, chunk or ids.shape[1])
    return logits[:, -1:].argmax(-1), time.perf_counter() - start


def step(model, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, float]:
    """One greedy decode step from ``token`` [1, 1]: the next token [1, 1] and the seconds it took."""
    start = time.perf_counter()
    token = model(token, **with_cache(model, cache)).logits[:, -1:].argmax(-1)
    return token, time.perf_counter() - start


def median(values: list[float]) -> float:
    """The middle value; of an even count the upper one (a ratio's median then errs high, not low)."""
    return sorted(values)[len(values) // 2]


def run(model, ids: torch.Tensor, new_cache: Callable[[], Any], chunk: int | None, steps: int, repeats: int) -> dict:
    """Prefill ``ids`` [1, n] (in chunks if given) into ``repeats`` new caches (the median time is
    reported), then decode ``steps`` tokens from the last one."""
    times, caches = interleave(model, ids, {"cache": new_cache}, chunk, steps, repeats)
    return {"prefill_s": round(median(times["cache"]["prefill"]), 3),
            "decode_ms": round(1000 * median(times["cache"]["decode"]), 2), "kv_bytes": kv_bytes(caches["cache"])}


@torch.inference_mode()
def interleave(model, ids: torch.Tensor, new_caches: dict[str, Callable[[], Any]], chunk: int | None, steps: int,
               repeats: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Time every cache of ``new_caches`` on ``ids`` [1, n] in turn: ``repeats`` rounds of one chunked
    prefill each, then ``steps`` rounds of one decode step each from the last prefill (the order
    rotating from round to round). Seconds per round: ``{name: {"prefill": [repeats], "decode":
    [steps - WARMUP]}}`` (the first decode rounds are warm-up), and the last caches ``{name: cache}``."""
    names = list(new_caches)
    times = {name: {"prefill": [], "decode": []} for name in names}
    caches, tokens = {}, {}
    for r in range(repeats):
        for name in rotated(names, r):
            caches[name] = new_caches[name]()
            tokens[name], seconds = prefill(model, ids, caches[name], chunk)
            times[name]["prefill"].append(seconds)
    for s in range(steps):
        for name in rotated(names, s):
            tokens[name], seconds = step(model, tokens[name], caches[name])
            if s >= WARMUP:
                times[name]["decode"].append(seconds)
    return times, caches


def rotated(names: list[str], by: int) -> list[str]:
    """``names`` starting at index ``by`` (modulo their number)."""
    return names[by % len(names):] + names[:by % len(names)]


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]`` (a slowdown that hits a whole round cancels)."""
    return median([t / r for t, r in zip(times, reference, strict=True)])


def context_ids(model, n: int) -> torch.Tensor:
    """A fixed random-token context [1, n] (speed does not depend on the text)."""
    return torch.randint(100, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))


def measure(config: dict) -> dict:
    """One (context, cache) run in this process; adds the peak RSS and the RSS after loading the model."""
    torch.set_num_threads(config["threads"])
    model, _ = load_model(config["model"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n, kind, budget = config["context"], config["kind"], config["budget"]
    ids = context_ids(model, n)
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


def measure_paired(config: dict) -> list[dict]:
    """The evicting caches of one context interleaved in this process (``config["kinds"]``, the first
    the reference): median prefill and decode times and the paired ratios to the reference."""
    torch.set_num_threads(config["threads"])
    model, _ = load_model(config["model"])
    n, budget, kinds = config["context"], config["budget"], config["kinds"]
    new_caches = {kind: (lambda kind=kind: EvictionCache(model, kind, budget=budget)) for kind in kinds}
    times, _ = interleave(model, context_ids(model, n), new_caches, config["chunk"], config["steps"], config["repeats"])
    ref = times[kinds[0]]
    return [{"model": config["model"], "context": n, "cache": f"{kind}-{budget}",
             "prefill_s": round(median(t["prefill"]), 3),
             "prefill_vs_ref": round(paired_ratio(t["prefill"], ref["prefill"]), 3),
             "decode_ms": round(1000 * median(t["decode"]), 2),
             "decode_vs_ref": round(paired_ratio(t["decode"], ref["decode"]), 3)}
            for kind, t in times.items()]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--policies", nargs="+", default=["streaming", "learned"])
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk of the evicting caches")
    p.add_argument("--steps", type=int, default=34, help=f"decode steps per run (the first {WARMUP} are warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per run (the median time is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paired", action="store_true",
                   help="interleave the evicting caches in one process per context; ratios to the first policy")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: a JSON config to measure in this process
    args = p.parse_args(argv)
    if args.steps <= WARMUP:
        p.error(f"--steps must be at least {WARMUP + 1} (the first {WARMUP} decode steps are warm-up), got {args.steps}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.paired and (len(args.policies) < 2 or len(set(args.policies)) < len(args.policies)):
        p.error(f"--paired compares distinct policies with the first one: give at least two, got {args.policies}")
    if args.paired and {"full", "plain"} & set(args.policies):
        p.error("--paired interleaves evicting caches only; the full and plain caches run without it")
    if args.one:
        config = json.loads(args.one)
        print(json.dumps(measure_paired(config) if "kinds" in config else measure(config)))
        return []
    if args.paired:
        return main_paired(args)
    rows = []
    kinds = ["full", *args.policies, "plain"]
    for n, kind in tqdm([(n, k) for n in args.contexts for k in kinds], desc="speed"):
        config = dict(model=args.model, context=n, kind=kind, budget=args.budget, chunk=args.chunk, steps=args.steps,
                      repeats=args.repeats, threads=args.threads)
        rows.append(in_child(config))
        tqdm.write(json.dumps(rows[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"speed_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    stem.with_suffix(".md").write_text(table(rows, args.policies[0], args.threads) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(table(rows, args.policies[0], args.threads))
    return rows


def in_child(config: dict) -> Any:
    """Measure ``config`` in a fresh process (its own peak RSS); its errors reach this process's stderr."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main_paired(args: argparse.Namespace) -> list[dict]:
    """``--paired``: one process per context; writes ``speed_<model>_paired.{json,md}``."""
    rows = []
    for n in tqdm(args.contexts, desc="speed (paired)"):
        config = dict(model=args.model, context=n, kinds=args.policies, budget=args.budget, chunk=args.chunk,
                      steps=args.steps, repeats=args.repeats, threads=args.threads)
        rows += in_child(config)
        tqdm.write(json.dumps(rows[-len(args.policies):]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"speed_{args.model}_paired"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    reference = args.policies[0]
    lines = [f"# Evicting caches interleaved ({rows[0]['model']}, {hardware(threads=args.threads)}; ratios: median of per-round ratios "
             f"to {reference}, {args.repeats} prefills and {args.steps - WARMUP} decode steps each)", "",
             f"| context | cache | prefill s | vs {reference} | decode ms/token | vs {reference} |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['cache']} | {r['prefill_s']} | {r['prefill_vs_ref']:.2f}x | {r['decode_ms']} | "
              f"{r['decode_vs_ref']:.2f}x |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def table(rows: list[dict], reference: str, threads: int) -> str:
    """Markdown table; prefill and decode times relative to the ``reference`` evicting cache, decode also
    to the plain cache; measured on ``threads`` CPU threads."""
    def rel(r: dict, prefix: str, key: str = "decode_ms") -> str:
        base = [x[key] for x in rows if x["context"] == r["context"] and x["cache"].startswith(prefix)]
        return f"{r[key] / base[0]:.2f}x" if base else "-"

    ref = reference + "-"
    lines = [f"# Prefill, decode speed and memory ({rows[0]['model']}, {hardware(threads=threads)})", "",
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
