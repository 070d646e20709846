"""Long-context tasks (RULER-style + real text) for models x policies x budgets x lengths.

    python bench/ruler.py --model smollm2-135m --lengths 2048 4096 --policies full snapkv tova \
        --budgets 0.1 0.25 0.5 --samples 4

Query-agnostic protocol: each context is compressed in chunks, then the question is appended with
eviction paused. Resumable: results accumulate in ``bench/results/ruler_<model>.jsonl`` (one line
per sample) and finished samples are skipped; the summary (markdown + CSV) and a plot of score vs
budget per task are rewritten at the end of every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvevict import EvictionCache  # noqa: E402
from kvevict.evaluate import answer, score_answer  # noqa: E402
from kvevict.models import load_model  # noqa: E402
from kvevict.tasks import TASKS  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    p.add_argument("--policies", nargs="+", default=["full", "streaming", "snapkv", "tova", "expected_attention"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = RESULTS / f"ruler_{args.model}.jsonl"
    done = set()
    if log.exists():
        done = {tuple(r["key"]) for r in map(json.loads, log.read_text().splitlines())}
    model, tok = load_model(args.model)
    runs = [(length, task, policy, budget, seed)
            for length in args.lengths for task in args.tasks for seed in range(args.samples)
            for policy, budget in [("full", None)] * ("full" in args.policies)
            + [(pol, b) for pol in args.policies if pol != "full" for b in args.budgets]]
    started = time.perf_counter()
    prompts: dict = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        for length, task, policy, budget, seed in tqdm(runs, desc=f"ruler {args.model}"):
            key = [args.model, length, task, policy, budget, seed]
            if tuple(key) in done:
                continue
            if (length, task, seed) not in prompts:
                prompts[(length, task, seed)] = TASKS[task].build(tok, length, seed)
            prompt = prompts[(length, task, seed)]
            cache = (DynamicCache(config=model.config) if policy == "full"
                     else EvictionCache(model, policy, budget=budget))
            text, seconds = answer(model, tok, prompt, cache, args.chunk, args.max_new_tokens)
            row = {"key": key, "model": args.model, "length": length, "task": task, "policy": policy,
                   "budget": budget, "seed": seed, "score": score_answer(text, prompt.answers),
                   "output": text, "answers": list(prompt.answers), "prefill_s": round(seconds, 3)}
            out.write(json.dumps(row) + "\n")
            out.flush()
    summarize(log, args.model, (time.perf_counter() - started) / 60)


def summarize(log: Path, model: str, minutes: float) -> None:
    """Mean score per (length, task, policy, budget): markdown, CSV and a plot."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in map(json.loads, log.read_text().splitlines()):
        groups[(row["length"], row["task"], row["policy"], row["budget"])].append(row["score"])
    rows = [{"length": k[0], "task": k[1], "policy": k[2], "budget": k[3], "score": sum(v) / len(v), "n": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 2))]
    stem = RESULTS / f"ruler_{model}"
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    lines = [f"# Long-context tasks on {model} (query-agnostic)", "",
             f"Mean score (RULER substring match) over n samples; this run took {minutes:.1f} min on a 2-core CPU.", ""]
    for length in sorted({r["length"] for r in rows}):
        tasks = sorted({r["task"] for r in rows if r["length"] == length})
        lines += [f"## {length} tokens", "", "| policy | budget | " + " | ".join(tasks) + " | mean |",
                  "|---|---|" + "---|" * (len(tasks) + 1)]
        for policy, budget in sorted({(r["policy"], r["budget"]) for r in rows if r["length"] == length},
                                     key=lambda x: (x[0] != "full", x[0], x[1] or 0)):
            cells = {r["task"]: r for r in rows if (r["length"], r["policy"], r["budget"]) == (length, policy, budget)}
            scores = [cells[t]["score"] for t in tasks if t in cells]
            lines.append(f"| {policy} | {'-' if budget is None else f'{budget:.0%}'} | "
                         + " | ".join(f"{cells[t]['score']:.2f} (n={cells[t]['n']})" if t in cells else "-" for t in tasks)
                         + f" | {sum(scores) / max(len(scores), 1):.2f} |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, budgets, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def plot(rows: list[dict], budgets: list[float], path: Path) -> None:
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for policy in sorted({r["policy"] for r in rows if r["policy"] != "full"}):
            pts = sorted((r["budget"], r["score"]) for r in rows
                         if r["task"] == task and r["policy"] == policy and r["length"] == max(x["length"] for x in rows))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        full = [r["score"] for r in rows if r["task"] == task and r["policy"] == "full"
                and r["length"] == max(x["length"] for x in rows)]
        if full:
            ax.axhline(full[0], color="black", linestyle="--", label="full cache")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("budget (fraction kept)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
