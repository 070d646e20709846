"""Long-context tasks (RULER-style + real text) for models x policies x budgets x lengths.

    python bench/ruler.py --model smollm2-135m --lengths 2048 4096 --policies full snapkv tova \
        --presses SnapKVPress --budgets 0.1 0.25 0.5 --samples 4

Query-agnostic protocol: each context is compressed in chunks, then the question is appended with
eviction paused. ``--presses`` runs NVIDIA kvpress's presses on the same prompts and budgets in
kvpress's own environment (see ``bench/kvpress_side.py``: one-pass prefill, forced by kvpress).
Every row also records the KV bytes held after the context, its prefill time and decode ms/token. Resumable: results accumulate in ``<out>/ruler_<model>.jsonl`` (``--out``, default ``bench/results``; one line
per sample) and finished samples are skipped; the summary (markdown + CSV) and a plot of score vs
budget per task are rewritten at the end of every run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvevict import EvictionCache  # noqa: E402
from kvevict.evaluate import (Prompt, answer, at_least, check_cards, check_policy_names, policy_cards,  # noqa: E402
                              score_answer)
from kvevict.fetch import Unavailable  # noqa: E402
from kvevict.machine import hardware  # noqa: E402
from kvevict.models import load_model  # noqa: E402
from kvevict.tasks import TASKS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also under `kvevict bench`
from kvpress_side import run_presses  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEGACY_SETTINGS = {"max_new_tokens": 32, "chunk": 512}  # of the records written before they named their settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    buildable = [t for t in sorted(TASKS) if TASKS[t].available()]
    p.add_argument("--tasks", nargs="+", default=buildable, choices=sorted(TASKS),
                   help=f"default: every task whose data can be had here ({', '.join(buildable)})")
    p.add_argument("--policies", nargs="+", default=["full", "streaming", "snapkv", "tova", "expected_attention"])
    p.add_argument("--presses", nargs="*", default=[], help="kvpress presses run side by side (e.g. SnapKVPress)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--samples", type=at_least(1), default=4)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (log, tables, plot)")
    args = p.parse_args(argv)
    for task in args.tasks:
        try:
            TASKS[task].check()
        except Unavailable as e:
            p.error(f"task {task} cannot be built here: {e}")
    torch.set_num_threads(args.threads)
    log = args.out / f"ruler_{args.model}.jsonl"
    settings = {"max_new_tokens": args.max_new_tokens, "chunk": args.chunk}
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    made = {tuple({**LEGACY_SETTINGS, **{k: r[k] for k in settings if k in r}}.items()) for r in records}
    if made - {tuple(settings.items())}:
        p.error(f"{log} holds runs made with other settings ({', '.join(map(str, map(dict, made)))}) than "
                f"these ({settings}): pass those, or --out elsewhere")
    done = {tuple(r["key"]) for r in records}
    model, tok = load_model(args.model)
    try:
        check_policy_names(args.policies, model.config)
        cards = policy_cards(args.policies, model.config)
        check_cards(records, cards, log)
    except ValueError as e:
        p.error(str(e))
    runs = [(length, task, policy, budget, seed)
            for length in args.lengths for task in args.tasks for seed in range(args.samples)
            for policy, budget in [("full", None)] * ("full" in args.policies)
            + [(pol, b) for pol in args.policies if pol != "full" for b in args.budgets]]

    @functools.cache
    def prompt(length: int, task: str, seed: int) -> Prompt:
        return TASKS[task].build(tok, length, seed)

    args.out.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        for length, task, policy, budget, seed in tqdm(runs, desc=f"ruler {args.model}"):
            key = [args.model, length, task, policy, budget, seed]
            if tuple(key) in done:
                continue
            cache = (DynamicCache(config=model.config) if policy == "full"
                     else EvictionCache(model, policy, budget=budget))
            start = time.perf_counter()
            result = answer(model, tok, prompt(length, task, seed), cache, args.chunk, args.max_new_tokens)
            out.write(json.dumps({**row(key, prompt(length, task, seed), result.text, result.prefill_s,
                                        result.kv_bytes, result.decode_ms, result.peak_rss_mb,
                                        time.perf_counter() - start), **settings,
                                   **({"card": cards[policy]} if policy in cards else {})}) + "\n")
            out.flush()
        for length in args.lengths:  # kvpress side by side, on the same prompts
            for press in tqdm(args.presses, desc=f"kvpress {args.model} {length}"):
                policy = f"kvpress:{press}"
                keys = [(length, task, seed) for task in args.tasks for seed in range(args.samples)
                        if any((args.model, length, task, policy, b, seed) not in done for b in args.budgets)]
                if not keys:
                    continue
                for run in run_presses(args.model, model, [press], args.budgets, [], 0, [prompt(*k) for k in keys],
                                       args.max_new_tokens, args.threads):
                    for (_, task, seed), a in zip(keys, run.get("answers") or [run] * len(keys)):
                        key = [args.model, length, task, policy, run["budget"], seed]
                        if tuple(key) in done:
                            continue
                        if "error" in a:  # a failed press: recorded (not retried), listed apart in the summary
                            record = {**identity(key), "error": a["error"], "elapsed_s": 0.0}
                        else:
                            record = row(key, prompt(length, task, seed), a["text"], a["prefill_s"], a["kv_bytes"],
                                         a["decode_ms"], a["peak_rss_mb"], a["seconds"])
                        out.write(json.dumps({**record, **settings}) + "\n")
                out.flush()
    summarize(log, args.model)


def row(key: list, prompt: Prompt, text: str, prefill_s: float, kv_bytes: int, decode_ms: float,
        peak_rss_mb: float | None, elapsed_s: float) -> dict:
    """One result line: the run's key, its score and costs (``elapsed_s``: the whole run; peak RSS of the
    process during the run, model weights included)."""
    return {**identity(key), "score": score_answer(text, prompt.answers), "output": text, "answers": list(prompt.answers),
            "prefill_s": round(prefill_s, 3), "kv_mb": round(kv_bytes / 2**20, 2), "decode_ms": round(decode_ms, 1),
            "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb), "elapsed_s": round(elapsed_s, 2)}


def identity(key: list) -> dict:
    """The fields that name a run: its key and the key's parts."""
    model, length, task, policy, budget, seed = key
    return {"key": key, "model": model, "length": length, "task": task, "policy": policy, "budget": budget,
            "seed": seed}


def summarize(log: Path, model: str) -> None:
    """Mean score and costs per (length, task, policy, budget) over every sample in the log (a run
    with fewer ``--samples`` than earlier ones leaves their cells as they were): markdown, CSV and a plot, written beside the log."""
    first = {}  # one record per run: the first written (a later one repeats a finished run)
    for r in map(json.loads, log.read_text().splitlines()):
        first.setdefault(tuple(r["key"]), r)
    records = list(first.values())
    failed = sorted({(r["length"], r["policy"], r["budget"], r["error"]) for r in records if "error" in r},
                    key=lambda f: (f[0], order(f[1], f[2])))
    records = [r for r in records if "error" not in r]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["length"], r["task"], r["policy"], r["budget"])].append(r)
    rows = [{"length": k[0], "task": k[1], "policy": k[2], "budget": k[3], "n": len(v),
             **{m: average([r.get(m) for r in v]) for m in METRICS}}
            for k, v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order(kv[0][2], kv[0][3])))]
    stem = log.with_name(f"ruler_{model}")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    minutes = sum(r["elapsed_s"] for r in records) / 60
    lines = [f"# Long-context tasks on {model} (query-agnostic)", "",
             "Mean score (RULER substring match) over n samples per task. Costs: KV MB held after the context, "
             "its prefill time, decode ms per answer token (question included) and the process's peak RSS during "
             "the run (model weights included; '-' for rows recorded before it was measured), averaged over the tasks. "
             f"Compute: {minutes:.1f} min summed over the {len(records)} runs in this table (the last run on a "
             f"{hardware()})."
             + (" Cells differ in their number of samples n (a later run added seeds to some): the mean over tasks "
                "weighs each task's mean equally." if len({r["n"] for r in rows}) > 1 else "")]
    shared = common_tasks(rows)
    with_mean = complete(rows, shared)
    for length in sorted(shared):
        left = sorted({r["task"] for r in rows if r["length"] == length} - set(shared[length]))
        if left:
            lines[-1] += f" At {length} tokens the means leave out {', '.join(left)}: not every row was run on them."
        partial = sorted({(r["policy"], r["budget"]) for r in rows if r["length"] == length
                          and (length, r["policy"], r["budget"]) not in with_mean}, key=lambda c: order(*c))
        if partial:
            lines[-1] += (f" At {length} tokens these rows miss one of the tasks of the means and have none (their costs "
                          f"average the tasks they ran): {', '.join(p if b is None else f'{p} @ {b:.0%}' for p, b in partial)}.")
    lines += [""] + overview(rows)
    for length in sorted(shared):
        tasks = sorted({r["task"] for r in rows if r["length"] == length})
        configs = sorted({(r["policy"], r["budget"]) for r in rows if r["length"] == length}, key=lambda c: order(*c))
        lines += [f"## {length} tokens", "", "| policy | budget | " + " | ".join(tasks) + " | mean | KV MB | prefill s "
                  "| decode ms | peak RSS MB |", "|---|---|" + "---|" * (len(tasks) + 5)]
        for policy, budget in configs:
            cells = {r["task"]: r for r in rows if (r["length"], r["policy"], r["budget"]) == (length, policy, budget)}
            whole = (length, policy, budget) in with_mean
            mean = {m: average([cells[t][m] for t in (shared[length] if whole else cells)]) for m in METRICS}
            rss = "-" if mean["peak_rss_mb"] is None else f"{mean['peak_rss_mb']:.0f}"
            score = f"**{mean['score']:.2f}**" if whole else "-"
            lines.append(f"| {policy} | {'-' if budget is None else f'{budget:.0%}'} | "
                         + " | ".join(f"{cells[t]['score']:.2f} (n={cells[t]['n']})" if t in cells else "-" for t in tasks)
                         + f" | {score} | {mean['kv_mb']:.1f} | {mean['prefill_s']:.2f} | "
                         f"{mean['decode_ms']:.1f} | {rss} |")
        lines.append("")
    if failed:
        lines += ["## Failed runs", "", "| length | policy | budget | error |", "|---|---|---|---|"]
        lines += [f"| {length} | {policy} | {budget:.0%} | {error[:200].replace('|', '/')} |" for length, policy, budget, error in failed]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


METRICS = ("score", "kv_mb", "prefill_s", "decode_ms", "peak_rss_mb")


def average(values: list[float | None]) -> float | None:
    """The mean, or ``None`` if any value is missing (a metric older rows did not record)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def tasks_run(rows: list[dict]) -> dict[tuple, set[str]]:
    """The tasks each (length, policy, budget) row was run on."""
    ran: dict[tuple, set[str]] = defaultdict(set)
    for r in rows:
        ran[(r["length"], r["policy"], r["budget"])].add(r["task"])
    return ran


def common_tasks(rows: list[dict]) -> dict[int, list[str]]:
    """Per length, the tasks every (policy, budget) row run on the most-run tasks was run on: the means are
    taken over these alone, so that rows run on more tasks stay comparable with the others; a row run on
    only a few other tasks gets no mean."""
    by_length: dict[int, list[set[str]]] = defaultdict(list)
    for (length, _, _), ran in tasks_run(rows).items():
        by_length[length].append(ran)
    shared = {}
    for length, configs in by_length.items():
        runs = Counter(t for ran in configs for t in ran)
        top = {t for t, n in runs.items() if n == max(runs.values())}
        shared[length] = sorted(set.intersection(*(ran for ran in configs if top <= ran)))
    return shared


def complete(rows: list[dict], shared: dict[int, list[str]]) -> set[tuple]:
    """The (length, policy, budget) rows that were run on every task of ``shared`` at their length: the ones with a mean."""
    return {config for config, ran in tasks_run(rows).items() if set(shared[config[0]]) <= ran}


def overview(rows: list[dict]) -> list[str]:
    """Markdown lines: the mean score over the common tasks per policy (rows) and length x budget (columns)."""
    mean: dict[tuple, list[float]] = defaultdict(list)
    shared = common_tasks(rows)
    for r in rows:
        if r["task"] in shared[r["length"]]:
            mean[(r["policy"], r["length"], r["budget"])].append(r["score"])
    with_mean = complete(rows, shared)
    mean = {(p, length, b): scores for (p, length, b), scores in mean.items() if (length, p, b) in with_mean}
    columns = sorted({(length, budget) for _, length, budget in mean}, key=lambda c: (c[0], c[1] or 0))
    policies = sorted({p for p, _, _ in mean}, key=lambda p: order(p, 0))
    head = " | ".join(f"{length} @ {'full' if b is None else f'{b:.0%}'}" for length, b in columns)
    lines = ["## Mean over tasks", "", f"| policy | {head} |", "|---|" + "---|" * len(columns)]
    for policy in policies:
        cells = [mean.get((policy, length, b)) for length, b in columns]
        lines.append(f"| {policy} | " + " | ".join("-" if not c else f"{sum(c) / len(c):.2f}" for c in cells) + " |")
    return lines + [""]


def order(policy: str, budget: float | None) -> tuple:
    """Table order: the full cache, kvevict's policies, then kvpress's presses; budgets ascending."""
    return policy != "full", policy.startswith("kvpress:"), policy, budget or 0


def plot(rows: list[dict], path: Path) -> None:
    """Score vs budget per task (and the mean over tasks) at each length; kvpress dashed."""
    shared = common_tasks(rows)
    with_mean = complete(rows, shared)
    lengths = sorted(shared)
    tasks = sorted({r["task"] for r in rows}) + ["mean"]
    fig, axes = plt.subplots(len(lengths), len(tasks), figsize=(2.6 * len(tasks), 2.6 * len(lengths)), squeeze=False)
    names = sorted({r["policy"] for r in rows if r["policy"] != "full"}, key=lambda p: order(p, 0))
    colors = {p: plt.cm.tab20(i % 20) for i, p in enumerate(names)}
    for axrow, length in zip(axes, lengths):
        at = [r for r in rows if r["length"] == length]
        for ax, task in zip(axrow, tasks):
            cells = defaultdict(list)  # (policy, budget) -> scores
            for r in at:
                if task == r["task"] or (task == "mean" and r["task"] in shared[length]):
                    cells[(r["policy"], r["budget"])].append(r["score"])
            if task == "mean":  # rows missing a shared task have no mean
                cells = defaultdict(list, {(p, b): v for (p, b), v in cells.items() if (length, p, b) in with_mean})
            for policy in sorted({p for p, _ in cells if p != "full"}, key=lambda p: order(p, 0)):
                pts = sorted((b, sum(v) / len(v)) for (p, b), v in cells.items() if p == policy)
                ax.plot(*zip(*pts), marker="o", markersize=3, linestyle="--" if policy.startswith("kvpress:") else "-",
                        color=colors[policy], linewidth=2.5 if policy == "learned" else 1.2, label=policy)
            if ("full", None) in cells:
                v = cells[("full", None)]
                ax.axhline(sum(v) / len(v), color="black", linestyle=":", label="full cache")
            ax.set_title(f"{task} @ {length}", fontsize=8)
            ax.set_ylim(-0.05, 1.05)
            ax.tick_params(labelsize=7)
        axrow[0].set_ylabel("score")
    for ax in axes[-1]:
        ax.set_xlabel("budget (fraction kept)", fontsize=8)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
