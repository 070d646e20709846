"""Every policy x budget on one model: fidelity, single-needle retrieval and prefill cost.

    python bench/policies.py --model smollm2-135m --length 4096 --budgets 0.1 0.25 0.5

Query-agnostic: contexts are compressed in 512-token chunks before the question (or continuation)
is appended with eviction paused. Fidelity: NLL increase, top-1 agreement and KL vs the full cache
on the last ``--continuation`` tokens of ``--documents`` essay windows of ``--length`` tokens (that overlap
no other where the essays have room: ``kvevict.evaluate.window_offsets``); the table ends with paired
differences over the windows (± standard error) between each budget's lowest-KL policy and the others,
which tell a real gap from the spread between windows. Needle: a 7-digit
number at several depths of an essay haystack of exactly ``--length`` context tokens. Results go to
``bench/results/policies_<model>_<length>.{json,md}``; rerunning skips the rows already measured on at
least ``--documents`` windows (rows on fewer are measured again and replaced); a results file holds one
``--continuation``, one set of ``--depths`` and one ``--chunk`` (other settings: another ``--out``).
Notes written by hand in ``policies_<model>_<length>.notes.md`` are appended to the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from kvevict import EvictionCache
from kvevict.evaluate import (answer, check_cards, check_policy_names, continuation_logits, fidelity, load_policy_table,
                              policy_cards, policy_row, policy_workload, save_policy_rows, score_answer, table_settings,
                              workload_arguments)
from kvevict.machine import hardware
from kvevict.models import load_model

POLICIES = ["random", "streaming", "h2o", "snapkv", "tova", "knorm", "keydiff", "expected_attention",
            "critical-snapkv", "pyramid:snapkv", "adakv:snapkv", "global-sum:snapkv", "learned"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p)
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.out / f"policies_{args.model}_{args.length}"
    settings = {**table_settings(args), "chunk": args.chunk}  # kvpress's rows (one-pass prefill) record no chunk
    try:
        rows = load_policy_table(stem.with_suffix(".json"), settings)
    except ValueError as e:
        p.error(str(e))
    done = {(r["policy"], r["budget"]) for r in rows if r.get("documents", 1) >= args.documents}

    model, tok = load_model(args.model)
    try:
        check_policy_names(args.policies, model.config)
        cards = policy_cards(args.policies, model.config)
        check_cards(rows, cards, stem.with_suffix(".json"))
    except ValueError as e:
        p.error(str(e))
    work = policy_workload(tok, args.length, args.continuation, args.documents, args.depths)
    docs, prefix, needles = work.documents, work.prefix, work.needles
    started = time.perf_counter()
    references = [continuation_logits(model, d, prefix, DynamicCache(config=model.config), args.chunk)[0] for d in docs]
    configs = [("full", None)] + [(pol, b) for pol in args.policies for b in args.budgets]
    for policy, budget in tqdm([c for c in configs if c not in done], desc=f"policies {args.model}"):
        def make_cache():
            if policy == "full":
                return DynamicCache(config=model.config)
            return EvictionCache(model, policy, budget=budget)

        fid = [fidelity(model, d, prefix, make_cache, ref, args.chunk) for d, ref in zip(docs, references)]
        hits = [score_answer(answer(model, tok, p, make_cache(), args.chunk).text, p.answers) for p in needles]
        row = {**policy_row(args.model, args.length, policy, budget, [asdict(f) for f in fid], hits), **settings,
               **({"card": cards[policy]} if policy in cards else {})}
        tqdm.write(json.dumps(row))
        rows = save_policy_rows(stem.with_suffix(".json"), rows, [row])  # replaces a row on fewer documents
    minutes = (time.perf_counter() - started) / 60
    notes = stem.parent / f"{stem.name}.notes.md"
    stem.with_suffix(".md").write_text(table(rows, args, minutes) + (f"\n{notes.read_text()}" if notes.exists() else ""))
    print(stem.with_suffix(".md").read_text())


def table(rows: list[dict], args: argparse.Namespace, minutes: float) -> str:
    """Markdown: one line per (policy, budget), prefill overhead relative to the full cache."""
    full = next(r for r in rows if r["policy"] == "full")
    lines = [
        f"# Policies on {args.model}, {args.length}-token contexts (query-agnostic)",
        "",
        f"Fidelity: essay windows (docs: how many), last {args.continuation} tokens of each scored; needle: "
        f"{len(args.depths)} depths ({', '.join(map(str, args.depths))}); prefill in {args.chunk}-token chunks "
        "('vs full': against the full cache's, '-' for a row prefilled otherwise, such as kvpress's one pass); "
        f"{hardware(threads=args.threads)}; the last run took {minutes:.1f} min (rows it did not measure come "
        "from earlier runs).",
        "",
        "| policy | budget | docs | NLL increase | top-1 agree | KL | needle | prefill s | vs full | KV MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(
            f"| {r['policy']} | {budget} | {r.get('documents', 1)} | {r['nll_increase']:+.3f} | {r['top1_agreement']:.3f} | {r['kl']:.3f} | "
            f"{r['needle']:.2f} | {r['prefill_s']:.2f} | {overhead(r, full)} | {r['kv_mb']:.1f} |"
        )
    return "\n".join(lines + paired(rows)) + "\n"


def overhead(row: dict, full: dict) -> str:
    """``row``'s prefill time over the full cache's, or ``-`` when they were prefilled otherwise (kvpress's
    rows: one pass, no chunks) and the ratio would mostly measure that."""
    if row.get("chunk") != full.get("chunk"):
        return "-"
    return f"{row['prefill_s'] / full['prefill_s']:.2f}x"


PAIRED = (("nll_increase", "NLL increase", -1), ("top1_agreement", "top-1 agree", 1), ("kl", "KL", -1))


def paired(rows: list[dict]) -> list[str]:
    """Markdown lines: at each budget and number of windows, the policy with the lowest KL against every
    other policy measured on the same windows (rows that keep per-window values; at least 2 windows): the
    mean difference of each measure over the windows (its value minus theirs) ± its standard error, and on
    how many it was better."""
    lines = []
    keep = [r for r in rows if r["budget"] is not None and r.get("documents", 1) >= 2 and "per_document" in r]
    for budget, documents in sorted({(r["budget"], r["documents"]) for r in keep}):
        at = [r for r in keep if r["budget"] == budget and r["documents"] == documents]
        if len(at) < 2:
            continue
        best = min(at, key=lambda r: r["kl"])
        for other in (r for r in at if r is not best):
            cells = []
            for key, _, sign in PAIRED:
                diff = [a - b for a, b in zip(best["per_document"][key], other["per_document"][key])]
                n, mean = len(diff), sum(diff) / len(diff)
                se = (sum((d - mean) ** 2 for d in diff) / (n - 1) / n) ** 0.5
                cells.append(f"{mean:+.4f} ± {se:.4f} ({sum(sign * d > 0 for d in diff)}/{n})")
            lines.append(f"| {budget:.0%} | {best['policy']} | {other['policy']} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["", "Paired over windows: at each budget (and number of windows) the lowest-KL policy against each "
            "policy measured on the same windows: mean difference (its value minus theirs) ± standard error over "
            "the windows, and on how many windows it was better.", "",
            "| budget | policy | vs | " + " | ".join(name for _, name, _ in PAIRED) + " |", "|---|---|---|---|---|---|", *lines]


if __name__ == "__main__":
    main()
