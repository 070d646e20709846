"""Regression calibration (KVzap-style): the cheap second mode, one forward pass per window.

Each of ``recipe.steps`` windows of general text gets regression targets (:mod:`.targets`: KVzip+'s,
or how often later tokens read each entry); ``tokens_per_window`` sampled entries per full-attention
layer keep their attention input and target. Then the gates' logits are fitted to the targets by
least squares:

    logit_hi = y_hi + c,   c = OFFSET - min(y)   (so every logit is >= OFFSET)

The learned policy scores an entry ``(t + 1 - i) log sigmoid(logit)`` ~ ``-(t + 1 - i) exp(-logit)``
for logits well above 0, so it ranks entries by ``y - log(age)``. The targets share one scale
across layers and heads, as the one shared projection needs.

No backward pass through the model, no attention over the whole window in the graph: windows the
length of the benchmark's contexts fit a CPU. Extracted windows are checkpointed one file each, so
an interrupted run resumes where it stopped; the fit is redone (seconds).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from .calibrate import Recipe, save_and_check, windows
from .gates import Card, Fingerprint, RetentionGates
from .machine import hardware
from .targets import kvzip_targets, reuse_targets

METHOD = {"kvzip": "KVzip+ regression (KVzap)", "reuse": "reuse regression"}  # the card's method, by target
OFFSET = 3.0  # the smallest fitted logit: log sigmoid(logit) ~ -exp(-logit) above it
HELD_OUT = 0.05  # share of the sampled entries kept out of the fit to measure it
BATCH = 512  # entries per layer in one optimizer step
EXTRACTION = ("model", "seq_len", "seed", "data", "tokens_per_window", "method", "target")  # what a checkpoint must share


def extract(model: PreTrainedModel, ids: list[int], frame: tuple[list[int], list[int]], recipe: Recipe,
            checkpoint: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Attention inputs ``[L, N, D]`` and targets ``[L, N, H]`` of ``N = steps x tokens_per_window``
    sampled entries of the ``L`` full-attention layers, and the seconds spent (resumed windows
    count what they cost then)."""
    recipe.check_text(ids)
    fp = Fingerprint.of(model.config)
    settings = {k: v for k, v in asdict(recipe).items() if k in EXTRACTION}
    if checkpoint is not None:
        _check_checkpoint(checkpoint, settings)
    rng = random.Random(recipe.seed)
    xs, ys, seconds = [], [], 0.0
    for k in tqdm(range(recipe.steps), desc=f"{recipe.target} targets"):
        context = windows(ids, recipe.seq_len, rng)[0].tolist()
        path = checkpoint / f"window-{k:05d}.safetensors" if checkpoint is not None else None
        if path is not None and path.exists():
            with safe_open(path, "pt") as saved:
                spent = float(saved.metadata()["seconds"])
            tensors = load_file(path)
        else:
            started = time.perf_counter()
            if recipe.target == "reuse":
                targets = reuse_targets(model, context, fp.full_layers, fp.kv_heads)
            else:
                targets = kvzip_targets(model, context, frame, fp.full_layers, fp.kv_heads)
            entries = targets[fp.full_layers[0]][1].shape[-1]
            pick = torch.randperm(entries, generator=torch.Generator().manual_seed(recipe.seed * 100_003 + k))
            pick = pick[: recipe.tokens_per_window]
            tensors = {"x": torch.stack([targets[l][0][pick] for l in fp.full_layers]),
                       "y": torch.stack([targets[l][1][:, pick].T for l in fp.full_layers])}
            spent = time.perf_counter() - started
            if path is not None:
                checkpoint.mkdir(parents=True, exist_ok=True)
                (checkpoint / "recipe.json").write_text(json.dumps(settings))
                save_file(tensors, path, metadata={"seconds": str(spent)})
        xs.append(tensors["x"])
        ys.append(tensors["y"])
        seconds += spent
    return torch.cat(xs, 1), torch.cat(ys, 1), seconds


def fit(gates: RetentionGates, x: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> tuple[float, list[dict]]:
    """Fit ``gates``' logits to ``y + c`` on ``x`` (``[L, N, D]``, ``[L, N, H]``) with AdamW; return
    ``c`` and the history (per epoch: mean squared error on the fitted and the held-out entries,
    and the rank correlation of logits and targets on the held-out ones)."""
    offset = OFFSET - y.min().item()
    order = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(recipe.seed))
    cut = held_out_count(len(order))
    test, train = order[:cut], order[cut:]
    layers = list(gates.fingerprint.full_layers)
    with torch.no_grad():
        gates.shared.bias.fill_((y[:, train] + offset).mean().item())  # start at the targets' mean level
    optimizer = torch.optim.AdamW(gates.parameters(), lr=recipe.lr)
    steps_per_epoch = -(-len(train) // BATCH)

    def predict(rows: torch.Tensor) -> torch.Tensor:  # [L, n, H]
        return torch.stack([z[0].T for z in gates.logits_layers(list(x[:, None, rows].unbind(0)), layers)])

    history = []
    for epoch in (bar := tqdm(range(recipe.epochs), desc="fit gates")):
        shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed + epoch + 1))]
        total = 0.0
        for i, rows in enumerate(shuffled.split(BATCH)):
            for group in optimizer.param_groups:
                group["lr"] = recipe.learning_rate(epoch * steps_per_epoch + i, recipe.epochs * steps_per_epoch)
            loss = (predict(rows) - y[:, rows] - offset).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        with torch.no_grad():
            held = predict(test)
            history.append({"epoch": epoch + 1, "mse": total / len(train),
                            "held_out_mse": (held - y[:, test] - offset).pow(2).mean().item(),
                            "held_out_rank_correlation": rank_correlation(held.flatten(), y[:, test].flatten())})
        bar.set_postfix(held_out_mse=f"{history[-1]['held_out_mse']:.3f}")
    return offset, history


def held_out_count(entries: int) -> int:
    """How many of ``entries`` sampled entries the fit keeps out to measure itself."""
    return max(1, int(entries * HELD_OUT))


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties ranked by order)."""
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp(min=1e-12)).item()


def calibrate_regression(model: PreTrainedModel, ids: list[int], frame: tuple[list[int], list[int]], recipe: Recipe,
                         out: Path, data_name: str, checkpoint: Path | None = None,
                         validation: list[int] | None = None) -> tuple[Path, list[dict]]:
    """Regression calibration of gates for ``model`` on token ids ``ids`` (``frame``:
    :func:`.targets.repeat_frame`); write the policy to ``out``; return its card path and the
    fit's history. With held-out token ids ``validation``, the card's allocator is chosen on them."""
    if validation is not None:
        recipe.check_held_out(validation)
    torch.set_num_threads(recipe.threads)
    model.requires_grad_(False).eval()
    x, y, seconds = extract(model, ids, frame, recipe, checkpoint)
    torch.manual_seed(recipe.seed)
    gates = RetentionGates(Fingerprint.of(model.config), width=recipe.width)
    started = time.perf_counter()
    offset, history = fit(gates, x, y, recipe)
    seconds += time.perf_counter() - started
    last = history[-1]
    card = Card(
        model=recipe.model, fingerprint=gates.fingerprint, width=recipe.width, method=METHOD[recipe.target], data=data_name,
        target_budget=0, steps=recipe.steps, seconds=round(seconds, 1), lookahead=recipe.lookahead,
        metrics={"held_out_mse": last["held_out_mse"], "held_out_rank_correlation": last["held_out_rank_correlation"],
                 "held_out_entries": held_out_count(x.shape[1]), "offset": offset, "entries": x.shape[1],
                 "recipe": asdict(recipe),
                 "hardware": hardware(next(model.parameters()).device, recipe.threads)},
    )
    return save_and_check(model, gates, card, out, validation, recipe), history


def _check_checkpoint(checkpoint: Path, settings: dict) -> None:
    """Refuse a checkpoint extracted under other settings (or by the other method)."""
    saved = checkpoint / "recipe.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"the checkpoint in {checkpoint} was made with other settings "
                         f"({json.loads(saved.read_text())}) than this recipe ({settings}); delete it "
                         "(or pass --fresh) to start again")
