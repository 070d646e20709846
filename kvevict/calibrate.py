"""Calibration of retention gates: soft eviction, distilled from the frozen model.

Only the gates learn. During training every attention logit gets the additive bias
``(t - i) log beta_i`` (entry ``i`` decays geometrically instead of being dropped), and the loss is

    sum_t w_t KL_t(frozen model || gated model) / sum_t w_t  +  lam * capacity,
    capacity = mean_t max(0, (S_t - L H M) / (L H (t + 1) - L H M)),  S_t = sum_{l,h} sum_{j<=t} beta_j^(t-j)

``S_t`` is the soft number of live entries over all full-attention layers ``L`` and KV heads ``H``;
``M`` the target entries per head. The token weights are 1, or with a long-range weight ``a > 0``
``w_t = 1 + a r_t / mean(r)``, where ``r_t = KL_t(frozen model || frozen model seeing only the last
`local_window` tokens and the first 4)`` measures how much token ``t`` needs distant context: the
tokens that recall something said long before (names, numbers, facts) count more than those any
recent window predicts. Text windows are sampled (seeded) from general text, never from
the benchmark data. With ``recall`` ``n > 0`` each window also carries ``n`` recall spans: a span of
``recall_len`` tokens from a random place in the corpus, inserted early in the window and repeated
near its end, so that keeping out-of-place text a later token copies counts in the loss (the frozen
model copies the repeat; the gated one can only if the first copy survived). Checkpoints (gates and
AdamW's state as safetensors, the loss history and the training settings as JSON) make runs
resumable: a resumed run continues with the same data order and optimizer state, so it ends where an
uninterrupted run would. The loss is computed from the last hidden states, the output head a slice of
tokens at a time, and large attention weights are recomputed in the backward pass, so that the
vocabulary does not multiply the memory of a long window.
Given held-out text, a run ends by choosing the policy's default allocator on it (:mod:`.validation`);
:func:`recheck` runs that check again for gates calibrated before.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AttentionInterface, PreTrainedModel

from .attention import refuse_unsupported
from .compat import attention_input, attention_modules
from .data import check_corpus
from .evaluate import token_kl
from .gates import Card, Fingerprint, RetentionGates, load_gates
from .machine import hardware
from .scoring.learned import check_lookahead, check_novelty
from .targets import TARGETS
from .validation import HeldOut, choose_allocator, choose_lookahead, choose_novelty, per_budget

SOFT_ATTENTION = "kvevict_soft"
SCHEDULES = ("constant", "cosine")
METHODS = ("distillation", "regression")  # end-to-end soft eviction, or a fit to regression targets (kvevict.regression)
SINKS = 4  # first tokens the local teacher of the long-range weights still sees
MIN_VALIDATE_LEN = 256  # held-out windows shorter than this leave no budget above the protected entries
KEPT_ELEMENTS = 2**26  # logits of one slice of the loss; larger attention weights are recomputed in backward


@dataclass(frozen=True)
class Recipe:
    """Calibration settings (one JSON file per shipped policy in ``calibration/recipes``)."""

    model: str
    seq_len: int = 512
    budget: int = 96
    steps: int = 150  # optimizer steps of one window each (distillation), or windows (regression)
    lr: float = 3e-3
    width: int = 128
    capacity_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    validate_len: int = 4096  # tokens per held-out window when choosing the allocator
    validate_windows: int = 2  # held-out windows (centred in equal parts of the held-out text)
    data: str = "shakespeare-plays"  # a corpus of kvevict.data.CALIBRATION_DATA
    validate_data: str | None = None  # the corpus whose held-out part the check reads (None: ``data``'s)
    schedule: str = "constant"  # learning rate: "constant", or "cosine" (decays to 0 over ``steps``)
    long_range_weight: float = 0.0  # ``a`` of the token weights (0: every token counts the same)
    local_window: int = 512  # recent tokens the local teacher of the long-range weights sees
    method: str = "distillation"  # or "regression": ``steps`` windows, one forward pass each, then a fit
    epochs: int = 15  # regression: passes of the fit over the sampled entries
    tokens_per_window: int = 1024  # regression: entries sampled per window for the fit
    target: str = "kvzip"  # regression: "kvzip" (KVzip+, KVzap's) or "reuse" (kvevict.targets)
    lookahead: int = 0  # the learned score's lookahead (steps) in the check and on the card; 0: none
    lookaheads: tuple[int, ...] = ()  # candidates the check chooses the card's lookahead from, per budget
    novelties: tuple[float, ...] = ()  # candidate weights of KeyDiff's signal the check chooses the card's from
    recall: int = 0  # recall spans per training window (distillation): inserted early, repeated near the end
    recall_len: int = 16  # tokens per recall span

    def __post_init__(self) -> None:
        counts = (("seq_len", 1), ("budget", 0), ("steps", 1), ("width", 1), ("seed", 0), ("threads", 1),
                  ("validate_len", 1), ("validate_windows", 1), ("local_window", 0), ("epochs", 1),
                  ("tokens_per_window", 1), ("recall", 0), ("recall_len", 1))
        for key, least in counts:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key} must be an int >= {least}, got {value!r}")
        for key in ("lr", "capacity_weight", "long_range_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.method == "distillation" and not 0 < self.budget < self.seq_len:
            raise ValueError(f"budget (target live entries per head) must lie between 0 and seq_len "
                             f"({self.seq_len}), got {self.budget}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.validate_len < MIN_VALIDATE_LEN:
            raise ValueError(f"validate_len must be >= {MIN_VALIDATE_LEN} tokens (each held-out window is a "
                             f"compressed prefix and its scored continuation), got {self.validate_len}")
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; known: {METHODS}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown regression target {self.target!r}; known: {TARGETS}")
        entries = self.seq_len // 2 if self.target == "reuse" else self.seq_len  # reuse: first half only
        if self.method == "regression" and not 0 < self.tokens_per_window <= entries:
            raise ValueError(f"tokens_per_window must lie in 1..{entries} (the entries a {self.target} window "
                             f"of {self.seq_len} yields), got {self.tokens_per_window}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; known: {SCHEDULES}")
        if self.long_range_weight and not 0 < self.local_window < self.seq_len:
            raise ValueError(f"local_window must lie between 0 and seq_len ({self.seq_len}), got {self.local_window}")
        check_corpus(self.data)
        check_corpus(self.held_out_data)
        check_lookahead(self.lookahead)
        object.__setattr__(self, "lookaheads", tuple(self.lookaheads))  # a JSON recipe gives a list
        for steps in self.lookaheads:
            check_lookahead(steps)
        object.__setattr__(self, "novelties", tuple(self.novelties))
        for weight in self.novelties:
            check_novelty(weight)
        if self.recall and self.method != "distillation":
            raise ValueError("recall spans are a distillation setting; the regression mode reads plain windows")
        if 4 * self.recall * self.recall_len > self.seq_len:
            raise ValueError(f"{self.recall} recall spans of {self.recall_len} tokens (each twice) leave too little of "
                             f"a {self.seq_len}-token window: at most a quarter of it may be recall spans and copies")

    def check_text(self, ids: list[int]) -> None:
        """Refuse calibration text too short to sample a window from."""
        if len(ids) <= self.seq_len:
            raise ValueError(f"calibration text of {len(ids)} tokens is too short for windows of {self.seq_len}")

    def check_held_out(self, ids: list[int]) -> None:
        """Refuse held-out text too short for the check's windows (before any training is spent)."""
        if len(ids) < self.validate_windows * self.validate_len:
            raise ValueError(f"the held-out text of {self.held_out_data!r} has {len(ids)} tokens, too few for "
                             f"validate_windows={self.validate_windows} x validate_len={self.validate_len}")

    @property
    def held_out_data(self) -> str:
        """The corpus whose held-out part the check at the end of calibration reads."""
        return self.validate_data or self.data

    def learning_rate(self, step: int, total: int | None = None) -> float:
        """The learning rate of the ``step``-th of ``total`` optimizer steps (from 0; default ``steps``)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / (total or self.steps)))
        return self.lr

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls(**json.loads(Path(path).read_text()))


class SoftEviction:
    """Gated forward passes: hooks compute ``log beta`` from each full layer's attention input and
    the registered ``kvevict_soft`` attention adds the decay bias. ``active`` False = plain causal;
    ``local`` set (and not active) = every layer sees only the last ``local`` tokens and the first ``SINKS``."""

    def __init__(self, model: PreTrainedModel, gates: RetentionGates) -> None:
        self.gates, self.active, self.model = gates, False, model
        self.local: int | None = None
        self.log_beta: dict[int, torch.Tensor] = {}
        self.previous = model.config._attn_implementation
        AttentionInterface.register(SOFT_ATTENTION, self.attention)
        model.set_attn_implementation(SOFT_ATTENTION)
        self.handles = [m.register_forward_pre_hook(self.hook, with_kwargs=True)
                        for m in attention_modules(model) if m.layer_idx in gates.index]

    def hook(self, module, args, kwargs) -> None:
        if self.active:
            self.log_beta[module.layer_idx] = self.gates(attention_input(args, kwargs), module.layer_idx)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """Causal (or sliding-window) attention over an unpadded batch, plus the decay bias. Under autograd,
        ``[T, T]`` weights of more than ``KEPT_ELEMENTS`` are recomputed in the backward pass instead of kept."""
        refuse_unsupported(kwargs, "calibration's soft eviction")
        log_beta = self.log_beta.get(module.layer_idx) if self.active else None
        local = self.local if not self.active else None
        attend = partial(soft_attention, scaling=scaling, window=getattr(module, "sliding_window", None), local=local)
        b, hq, t, _ = query.shape
        if _worth_recomputing(b * hq * t * t, query, key, value, log_beta):
            out = _recomputed(attend, query, key, value, log_beta)
        else:
            out = attend(query, key, value, log_beta)
        return out.transpose(1, 2).contiguous(), None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation(self.previous)


def soft_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_beta: torch.Tensor | None,
                   scaling: float, window: int | None = None, local: int | None = None) -> torch.Tensor:
    """Causal attention ``[B, Hq, T, d]`` of ``query`` ``[B, Hq, T, d]`` over ``key``/``value`` ``[B, H, T, d]``,
    within a sliding ``window``, or within the last ``local`` tokens and the first ``SINKS``; with the decay bias
    ``(t - i) log beta_i`` from ``log_beta`` ``[B, H, T]``."""
    b, hq, t, d = query.shape
    h = key.shape[1]
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query.view(b, h, hq // h, t, d), key) * scaling
    age = _ages(t, query.device)
    allowed = age >= 0
    if window:
        allowed &= age < window
    if local:
        allowed &= (age < local) | (torch.arange(t, device=query.device) < SINKS)[None, :]
    if log_beta is not None:
        logits = logits + age.clamp(min=0) * log_beta[:, :, None, None, :]
    probs = logits.masked_fill(~allowed, -torch.inf).softmax(-1)
    return torch.einsum("bhgqk,bhkd->bhgqd", probs, value).reshape(b, hq, t, -1)


def _worth_recomputing(elements: int, *inputs: torch.Tensor | None) -> bool:
    """Whether a function of ``inputs`` creating ``elements``-sized intermediates should recompute them in the
    backward pass: autograd records it and they are larger than ``KEPT_ELEMENTS``."""
    needed = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    return needed and elements > KEPT_ELEMENTS


def _recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
    """``fn(*args)``, its intermediate tensors recomputed in the backward pass instead of kept."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def _ages(t: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` query position minus key position (negative above the diagonal)."""
    return torch.arange(t, device=device)[:, None] - torch.arange(t, device=device)[None, :]


def _live(log_beta: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the soft count of live entries ``sum_{h, j <= t} beta_j^(t-j)`` of one layer's ``[B, H, T]``."""
    age = _ages(log_beta.shape[-1], log_beta.device)
    return torch.exp(age.clamp(min=0) * log_beta[:, :, None, :]).masked_fill(age < 0, 0).sum((1, 3))


def capacity_loss(log_betas: list[torch.Tensor], budget: int) -> torch.Tensor:
    """Hinge on the soft count of live entries. ``log_betas``: per layer ``[B, H, T]`` (each layer's
    ``[T, T]`` decays, beyond ``KEPT_ELEMENTS``, recomputed in the backward pass instead of kept)."""
    b, h, t = log_betas[0].shape
    live = sum(_recomputed(_live, lb) if _worth_recomputing(b * h * t * t, lb) else _live(lb) for lb in log_betas)
    slots = len(log_betas) * h
    full = slots * torch.arange(1, t + 1, device=live.device)
    room = (full - slots * budget).clamp(min=1)
    return torch.relu((live - slots * budget) / room).mean()


def final_hidden(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """The model's last hidden states ``[B, T, D]`` (what its output head reads) for token ids ``[B, T]``."""
    return model.base_model(batch, use_cache=False).last_hidden_state


def head_log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[B, t, V]`` (float32) from last hidden states ``[B, t, D]``: the output
    head, then the final logit soft-capping of models that have it (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float().log_softmax(-1)


def check_head(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """Refuse a model whose logits are not :func:`head_log_probs` of :func:`final_hidden` (some scale or
    cap them otherwise): the loss computed from hidden states would silently be another model's."""
    refusal = (f"calibration computes {type(model).__name__}'s logits from its last hidden states and its output "
               "head ({}): this architecture is not supported")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float().log_softmax(-1)
        try:
            got = head_log_probs(model, final_hidden(model, ids))
        except (AttributeError, TypeError) as e:  # no base model, no output head, not a linear head, ...
            raise ValueError(refusal.format(f"which fails: {e}")) from e
    gap = (got - expected).abs().max().item()
    if gap > 1e-3:
        raise ValueError(refusal.format(f"its log-probabilities differ from the model's own by up to {gap:.3g}"))


class _HeadKL(torch.autograd.Function):
    """Per-token KL of two sets of last hidden states' next-token distributions, a slice of tokens at a time.
    Token ``t``'s KL depends on the student's state ``t`` alone, so its gradient ``[D]`` is taken with the
    slice's logits and kept; the backward pass scales it by the incoming gradient (no logits kept or
    recomputed)."""

    @staticmethod
    def forward(ctx, model: PreTrainedModel, teacher: torch.Tensor, student: torch.Tensor, step: int,
                wants_grad: bool) -> torch.Tensor:
        parts, grads = [], []
        for s in range(0, student.shape[1], step):
            with torch.enable_grad():
                h = student[:, s : s + step].detach().requires_grad_(wants_grad)
                kl = token_kl(head_log_probs(model, teacher[:, s : s + step]), head_log_probs(model, h))
                if wants_grad:
                    grads.append(torch.autograd.grad(kl.sum(), h)[0])
            parts.append(kl.detach())
        if grads:
            ctx.save_for_backward(torch.cat(grads, dim=1))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (jacobian,) = ctx.saved_tensors
        return None, None, grad[..., None].to(jacobian) * jacobian, None, None


def hidden_kl(model: PreTrainedModel, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` ``[B, T]`` (float32) of the next-token distributions that last hidden
    states ``[B, T, D]`` give, ``KEPT_ELEMENTS`` logits a slice: the memory of a large vocabulary (Gemma 3's
    262k) stays that of a slice of tokens. Only ``student`` gets a gradient: the teacher is a fixed target
    (detached) and the output head, frozen during calibration, gets none."""
    b, t, _ = student.shape
    step = max(1, KEPT_ELEMENTS // (b * model.get_output_embeddings().weight.shape[0]))
    return _HeadKL.apply(model, teacher.detach(), student, step, torch.is_grad_enabled() and student.requires_grad)


def long_range_weights(reach: torch.Tensor, strength: float) -> torch.Tensor:
    """Token weights ``1 + strength * r_t / mean(r)`` ``[B, T]`` from ``reach`` ``r`` ``[B, T]``
    (each token's KL between the frozen model with the whole window and with a local one)."""
    return 1 + strength * reach / reach.mean().clamp(min=1e-12)


def windows(ids: list[int], seq_len: int, rng: random.Random, recall: int = 0, recall_len: int = 16) -> torch.Tensor:
    """One training window ``[1, seq_len]`` of ``ids`` at a random start. With ``recall`` spans, the window
    is shorter text with each span (``recall_len`` tokens from a random place in ``ids``) inserted in the
    text's first three quarters and repeated in its last eighth (places in the text: the spans inserted
    before a repeat push it later, to 85% of a 1024-token window or beyond with 2 spans of 16)."""
    text = seq_len - 2 * recall * recall_len
    start = rng.randrange(len(ids) - seq_len)
    window = ids[start : start + text]
    inserts = []  # (place in the text, tokens)
    for _ in range(recall):
        source = rng.randrange(len(ids) - recall_len)
        span = ids[source : source + recall_len]
        inserts += [(rng.randrange(int(0.875 * text), text + 1), span),
                    (rng.randrange(int(0.05 * text), int(0.75 * text)), span)]
    for place, span in sorted(inserts, key=lambda x: x[0], reverse=True):  # the latest first: places stay valid
        window = window[:place] + span + window[place:]
    return torch.tensor([window])


def calibrate(model: PreTrainedModel, ids: list[int], recipe: Recipe, out: Path, data_name: str,
              checkpoint: Path | None = None, validation: list[int] | None = None) -> tuple[Path, list[dict]]:
    """Train gates for ``model`` on token ids ``ids``; write the policy to ``out``; return its card
    path and the loss history. Resumes from ``checkpoint`` (a directory) when it holds a run. With
    held-out token ids ``validation``, the card's allocator is chosen on them; else it stays the
    balanced global budget."""
    recipe.check_text(ids)
    if validation is not None:
        recipe.check_held_out(validation)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    model.requires_grad_(False).eval()
    device = model.device
    gates = RetentionGates(Fingerprint.of(model.config), width=recipe.width).to(device)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=recipe.lr)
    history: list[dict] = []
    if checkpoint is not None and (checkpoint / "gates.safetensors").exists():
        history = _load_checkpoint(checkpoint, recipe, gates, optimizer)
    rng = random.Random(recipe.seed)
    for _ in range(len(history)):
        windows(ids, recipe.seq_len, rng, recipe.recall, recipe.recall_len)  # replay: a resumed run sees the same data
    soft = SoftEviction(model, gates)
    start = time.perf_counter() - sum(h["seconds"] for h in history[-1:])
    try:
        check_head(model, torch.tensor([ids[: min(64, recipe.seq_len)]], device=device))  # under soft.active False
        for step in tqdm(range(len(history), recipe.steps), desc="calibrate", initial=len(history),
                         total=recipe.steps):
            batch = windows(ids, recipe.seq_len, rng, recipe.recall, recipe.recall_len).to(device)
            soft.active = False
            with torch.no_grad():
                teacher = final_hidden(model, batch)
                weights = None
                if recipe.long_range_weight:
                    soft.local = recipe.local_window
                    reach = hidden_kl(model, teacher, final_hidden(model, batch))
                    soft.local = None
                    weights = long_range_weights(reach, recipe.long_range_weight)
            soft.active, soft.log_beta = True, {}
            per_token = hidden_kl(model, teacher, final_hidden(model, batch))
            kl = per_token.mean()
            fit = kl if weights is None else (weights * per_token).sum() / weights.sum()
            capacity = capacity_loss(list(soft.log_beta.values()), recipe.budget)
            loss = fit + recipe.capacity_weight * capacity
            optimizer.zero_grad()
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = recipe.learning_rate(step)
            optimizer.step()
            with torch.no_grad():
                beta = torch.cat([lb.flatten() for lb in soft.log_beta.values()]).exp()
                live = _expected_live(soft.log_beta)
            history.append({"step": step + 1, "kl": kl.item(), "capacity": capacity.item(),
                            "mean_beta": beta.mean().item(), "live_per_head": live,
                            "seconds": time.perf_counter() - start})
            if checkpoint is not None and ((step + 1) % 25 == 0 or step + 1 == recipe.steps):
                checkpoint.mkdir(parents=True, exist_ok=True)
                done = {"step": str(step + 1)}  # checked against the history when resuming
                (checkpoint / "recipe.json").write_text(json.dumps(_training_settings(recipe)))
                save_file({k: v.cpu().contiguous() for k, v in gates.state_dict().items()}, checkpoint / "gates.safetensors",
                          metadata=done)
                save_file(_optimizer_tensors(optimizer), checkpoint / "optimizer.safetensors", metadata=done)
                (checkpoint / "history.json").write_text(json.dumps(history))
    finally:
        soft.close()
    seconds = history[-1]["seconds"] if history else 0.0
    tail = history[-10:]
    card = Card(
        model=recipe.model, fingerprint=gates.fingerprint, width=recipe.width, method="soft-eviction distillation",
        data=data_name, target_budget=recipe.budget, steps=recipe.steps, seconds=round(seconds, 1),
        lookahead=recipe.lookahead,
        metrics={"final_kl": sum(h["kl"] for h in tail) / len(tail),
                 "final_capacity": sum(h["capacity"] for h in tail) / len(tail),
                 "live_per_head_at_end_of_window": tail[-1]["live_per_head"],
                 "recipe": asdict(recipe), "hardware": hardware(device, recipe.threads)},
    )
    return save_and_check(model, gates, card, out, validation, recipe), history


def save_and_check(model: PreTrainedModel, gates: RetentionGates, card: Card, out: Path,
                   validation: list[int] | None, recipe: Recipe) -> Path:
    """Write ``gates`` and ``card`` to ``out`` (trained gates are never lost to a failing check); then, given
    held-out token ids ``validation``, run the check on the gates as written (float16 weights, as shipped)
    and rewrite the card with its choices. Returns the card path."""
    path = gates.eval().save(out, card)
    if validation is not None:
        check_on_held_out(model, load_gates(model.config, path)[0], validation, recipe, card)
        card.write(path)
    return path


def recheck(model: PreTrainedModel, card_path: Path, validation: list[int], recipe: Recipe) -> Path:
    """Choose the allocator (and lookahead, novelty) of gates calibrated before (the card at ``card_path``) again
    on held-out token ids ``validation``, under ``recipe``'s check settings; rewrite the card. Refuses a card
    trained with other settings than ``recipe``'s."""
    gates, card = load_gates(model.config, card_path)
    check_made_by(card_path, recipe)
    card.metrics["recipe"] = asdict(recipe)
    check_on_held_out(model, gates, validation, recipe, card)
    card.write(card_path)
    return card_path


def check_made_by(card_path: Path, recipe: Recipe) -> None:
    """Refuse the card at ``card_path`` unless its gates were trained under ``recipe``'s training settings
    and for as many steps (the check's settings may differ)."""
    metrics = json.loads(Path(card_path).read_text()).get("metrics", {})
    recorded = {k: v for k, v in metrics.get("recipe", {}).items() if k in Recipe.__dataclass_fields__}
    made = Recipe(**{"model": recipe.model, **recorded})  # defaults for fields it predates
    made_with, wanted = ({**_training_settings(r), "steps": r.steps} for r in (made, recipe))
    if made_with != wanted:
        raise ValueError(f"{card_path} was calibrated with other settings ({made_with}) than this recipe ({wanted})")


def check_on_held_out(model: PreTrainedModel, gates: RetentionGates, validation: list[int], recipe: Recipe,
                      card: Card) -> None:
    """Choose ``card``'s allocator on held-out token ids, then (given ``recipe.lookaheads``) its lookahead
    per budget, then (given ``recipe.novelties``) its novelty weight; record the candidates' KL in its metrics."""
    torch.set_num_threads(recipe.threads)
    started = time.perf_counter()
    held_out = HeldOut(model, validation, recipe.validate_len, recipe.validate_windows)
    card.allocator, kl = choose_allocator(held_out, gates, lookahead=recipe.lookahead)
    card.lookahead = recipe.lookahead
    check = {"data": recipe.held_out_data, "tokens_per_window": recipe.validate_len,
             "windows": recipe.validate_windows, "kl": kl, "chosen": card.allocator}
    if recipe.lookaheads:
        card.lookahead, per_steps = choose_lookahead(held_out, gates, card.allocator, recipe.lookaheads,
                                                     measured=(recipe.lookahead, kl[card.allocator]))
        check["lookahead"] = {"kl": per_steps, "chosen": card.lookahead}
    card.novelty = 0.0
    if recipe.novelties:  # weight 0 under the chosen allocator and lookahead was measured above
        if recipe.lookaheads:
            known = {b: per_steps[str(n)][b] for b, n in card.lookahead.items()}
        else:
            known = per_budget(kl[card.allocator])
        card.novelty, per_weight = choose_novelty(held_out, gates, card.allocator, card.lookahead,
                                                  recipe.novelties, measured=(0.0, known))
        check["novelty"] = {"kl": per_weight, "chosen": card.novelty}
    card.metrics["validation"] = {**check, "seconds": round(time.perf_counter() - started, 1)}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat safetensors entries ``"<param index>.<name>"``."""
    return {f"{i}.{name}": t.cpu().contiguous()
            for i, state in optimizer.state_dict()["state"].items() for name, t in state.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`_optimizer_tensors`; the hyperparameters stay the optimizer's own."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _training_settings(recipe: Recipe) -> dict:
    """The recipe fields a resumed run must share with its checkpoint: all but the threads, the
    validation, the lookahead and (under a constant learning rate) the length of the run."""
    settings = asdict(recipe)
    for free in ("threads", "validate_len", "validate_windows", "validate_data", "lookahead", "lookaheads",
                 "novelties") + (
            ("steps",) if recipe.schedule == "constant" else ()):
        settings.pop(free)
    return settings


def _load_checkpoint(checkpoint: Path, recipe: Recipe, gates: RetentionGates,
                     optimizer: torch.optim.Optimizer) -> list[dict]:
    """Load gates and AdamW's state from ``checkpoint``; return the loss history. Refuses a checkpoint
    made with other training settings or another gate layout, one past ``recipe.steps``, and one whose
    files come from different steps (a run stopped while saving)."""
    if not (checkpoint / "recipe.json").exists():
        raise ValueError(f"the checkpoint in {checkpoint} records no training settings (an older kvevict made "
                         "it); delete it (or pass --fresh) to start again")
    defaults = _training_settings(Recipe(model=recipe.model, steps=recipe.steps))  # fields older checkpoints lack
    settings, wanted = {**defaults, **json.loads((checkpoint / "recipe.json").read_text())}, _training_settings(recipe)
    if settings != wanted:
        raise ValueError(f"the checkpoint in {checkpoint} was made with other settings ({settings}) than this "
                         f"recipe ({wanted}); delete it (or pass --fresh) to start again")
    history = json.loads((checkpoint / "history.json").read_text())
    if len(history) > recipe.steps:
        raise ValueError(f"the checkpoint in {checkpoint} has {len(history)} steps, more than the recipe's "
                         f"{recipe.steps}")
    files = [checkpoint / "gates.safetensors", checkpoint / "optimizer.safetensors"]
    files = [f for f in files if f.exists()]  # checkpoints before AdamW's state was saved restart its moments
    for f in files:
        with safe_open(f, "pt") as saved:
            step = (saved.metadata() or {}).get("step")
        if step is not None and int(step) != len(history):
            raise ValueError(f"the checkpoint in {checkpoint} is incomplete ({f.name} is from step {step}, the "
                             f"history has {len(history)}): the run stopped while saving; delete it to start again")
    weights = load_file(files[0])
    if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(v.shape) for k, v in gates.state_dict().items()}:
        raise ValueError(f"the checkpoint in {checkpoint} does not fit these gates (an older kvevict layout); "
                         "delete it to start again")
    gates.load_state_dict(weights)
    if len(files) == 2:
        _load_optimizer(optimizer, load_file(files[1]))
    return history


def _expected_live(log_betas: dict[int, torch.Tensor]) -> float:
    """Soft live entries per (layer, head) at the last position of the window."""
    counts = []
    for lb in log_betas.values():
        t = lb.shape[-1]
        age = torch.arange(t - 1, -1, -1, device=lb.device)
        counts.append(torch.exp(age * lb).sum(-1).mean().item())
    return sum(counts) / len(counts)
