"""The learned, cross-layer calibrated retention policy ("Make Each Token Count").

Each entry gets ``log beta`` from the retention gates when it is created (from the layer's attention
input); at step ``t`` it is worth ``(t + 1 - i) log beta_i``, optionally with a lookahead of ``n``
steps: ``(t + 1 - i) log beta + log(1 - beta^n) - log(1 - beta)`` (the entry's expected total
retention over the next ``n`` steps). The lookahead may depend on the budget (``{fraction: steps}``:
the entry at the budget nearest to the fraction of its tokens a row keeps). Scores share one scale
across layers and heads, so the policy pairs with the global allocator (one budget for the whole
model) or a threshold. :meth:`LearnedRetention.from_card` (and the name ``"learned"``) takes the default
allocator, lookahead and novelty its calibration chose on held-out text (the card's ``allocator``,
``lookahead`` and ``novelty``); the constructor alone takes none of them.

With ``novelty`` ``v > 0`` the score adds ``v (-cos(k_i, mean key))``, KeyDiff's signal: of entries
the gates rate alike, those whose key stands out from the head's others stay (in repetitive text the
gates see many near-identical entries; the one that differs is what a later question asks for).

With ``attention_weight`` ``w > 0`` the gates' prior is combined with observed evidence: the score
adds ``w log a_i``, where ``a_i`` is the attention entry ``i`` receives. ``"learned+snapkv"`` takes
``a_i`` from the last ``window`` queries (SnapKV's pooled estimate), so the policy then also reads
those queries: it keeps what the context's latest text attends to (better continuation fidelity at
small budgets on Gemma 3), at the cost of entries no recent query looks at (fewer needles found).
``"learned+h2o"`` takes it from every query so far (H2O's mean attention received), so it also
observes every forward pass's attention and scores each pass at once (no batched late scoring).
``"learned"`` is the gates alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..gates import DEFAULT_ALLOCATOR, Card, RetentionGates
from .base import Scorer, ScoreInputs
from .h2o import H2O
from .keydiff import KeyDiff
from .snapkv import SnapKV

LOG_BETA_CEILING = 1e-12  # log beta closer to 0 than this counts as this in the lookahead (no 0 / 0)
ATTENTION_FLOOR = 1e-8  # attention below this counts as this (log of an entry no query sees)
EVIDENCE = {SnapKV.name: SnapKV, H2O.name: H2O}  # the attention estimates the gates combine with
EVIDENCE_WEIGHT = 0.5  # best mean KL of 0.25 / 0.5 / 1 for SnapKV on Gemma 3's held-out check (earlier gates); untuned for H2O


def check_lookahead(lookahead: object) -> None:
    """Refuse a lookahead that is not a whole number of steps >= 0."""
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be an int >= 0 (steps; 0: none), got {lookahead!r}")


def check_novelty(novelty: object) -> None:
    """Refuse a novelty weight that is not a number >= 0."""
    if isinstance(novelty, bool) or not isinstance(novelty, (int, float)) or not 0 <= novelty < math.inf:
        raise ValueError(f"novelty must be a number >= 0 (the weight of KeyDiff's signal; 0: none), got {novelty!r}")


def parse_lookahead(lookahead: object) -> int | dict[float, int]:
    """A lookahead in steps, or one per budget ``{fraction: steps}`` (fractions in (0, 1], keys may be
    strings as in a JSON card), checked; the per-budget form with float keys."""
    if not isinstance(lookahead, Mapping):
        check_lookahead(lookahead)
        return lookahead  # type: ignore[return-value]
    if not lookahead:
        raise ValueError("a lookahead per budget needs at least one budget, got {}")
    schedule = {}
    for fraction, steps in lookahead.items():
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(fraction, bool) or not 0.0 < f <= 1.0:
            raise ValueError(f"a lookahead's budget must be a fraction in (0, 1], got {fraction!r}")
        check_lookahead(steps)
        schedule[f] = steps
    return schedule


class LearnedRetention(Scorer):
    name = "learned"
    observes = True
    calibrated = True
    needs_hidden = True

    def __init__(self, gates: RetentionGates, lookahead: int | Mapping[float, int] = 0,
                 default_allocator: str = DEFAULT_ALLOCATOR, attention_weight: float = 0.0,
                 evidence: str = SnapKV.name, window: int = 32, novelty: float = 0.0) -> None:
        """``lookahead``: steps, or steps per budget fraction (``{0.1: 256, 0.25: 0}``; the name then
        shows none); ``evidence`` (``"snapkv"`` or ``"h2o"``) is the attention estimate added at
        ``attention_weight``; ``window`` is SnapKV's query window; ``novelty`` the weight of KeyDiff's
        signal."""
        if (isinstance(attention_weight, bool) or not isinstance(attention_weight, (int, float))
                or not 0 <= attention_weight < math.inf):
            raise ValueError(f"attention_weight must be a finite number >= 0, got {attention_weight!r}")
        lookahead = parse_lookahead(lookahead)
        check_novelty(novelty)
        if evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {sorted(EVIDENCE)}, got {evidence!r}")
        self.gates, self.lookahead, self.default_allocator = gates, lookahead, default_allocator
        self.attention_weight, self.novelty = float(attention_weight), float(novelty)
        self.evidence = None
        if attention_weight:
            self.evidence = SnapKV(window) if evidence == SnapKV.name else EVIDENCE[evidence]()
            self.name = f"{type(self).name}+{evidence}"
        if isinstance(lookahead, int) and lookahead:
            self.name = f"{self.name}@{lookahead}"
        self.query_window = self.evidence.query_window if self.evidence else 0
        self.scores_late = not (self.evidence and self.evidence.observes)  # evidence seen each pass: score each pass
        self.accumulates = bool(self.evidence and self.evidence.accumulates)
        self.placed = False

    @classmethod
    def from_card(cls, gates: RetentionGates, card: Card, **settings: object) -> "LearnedRetention":
        """The policy a card describes: its gates under the card's allocator, lookahead and novelty weight,
        each overridden by ``settings`` (any of this class's arguments), as ``"learned@512"`` does by name.
        The name shows the overrides of the card's novelty and the explicit lookahead ``0``."""
        defaults = {"lookahead": card.lookahead, "novelty": card.novelty, "default_allocator": card.allocator}
        scorer = cls(gates, **{**defaults, **settings})  # type: ignore[arg-type]
        if settings.get("lookahead") == 0:
            scorer.name += "@0"  # asked for none: told apart from a card's lookahead (which may be per budget)
        if "novelty" in settings:
            scorer.name += f"~{scorer.novelty:g}"  # asked for: told apart from the card's
        return scorer

    @torch.no_grad()
    def observe(self, inputs: ScoreInputs) -> None:
        """Score the newest ``q`` entries (the last ``q`` slots) from their attention inputs; let an
        observing evidence scorer see this pass's queries."""
        self._store(inputs, self.gates(self._placed(inputs.hidden), inputs.layer_idx))
        if self.evidence is not None and self.evidence.observes:
            self.evidence.observe(inputs)

    @torch.no_grad()
    def observe_layers(self, inputs: list[ScoreInputs]) -> None:
        """:meth:`observe` for several layers in one batched pass through the gates."""
        hidden = [self._placed(x.hidden) for x in inputs]
        for x, log_beta in zip(inputs, self.gates.forward_layers(hidden, [x.layer_idx for x in inputs])):
            self._store(x, log_beta)

    def _placed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Move the gates to the device of the first hidden states they see; bring later ones to them."""
        if not self.placed:
            self.gates.to(hidden.device)
            self.placed = True
        return hidden.to(self.gates.w1.device)

    @staticmethod
    def _store(inputs: ScoreInputs, log_beta: torch.Tensor) -> None:
        """Write ``log_beta`` ``[B, H, q]`` into the state of the last ``q`` slots."""
        state = inputs.state
        if "log_beta" not in state:
            state["log_beta"] = torch.zeros(inputs.positions.shape, device=inputs.keys.device)
        state["log_beta"][..., -log_beta.shape[-1]:] = log_beta.to(inputs.keys.device, torch.float32)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        log_beta = inputs.state["log_beta"]
        age = (inputs.seen - inputs.positions).clamp(min=1).float()
        score = age * log_beta
        steps = self.steps(inputs.kept)
        if isinstance(steps, torch.Tensor) or steps:  # log((1 - beta^n) / (1 - beta)): 0 at n = 1, log n as beta -> 1
            x = log_beta.clamp(max=-LOG_BETA_CEILING)
            n = steps.clamp(min=1).view(-1, 1, 1).to(x) if isinstance(steps, torch.Tensor) else steps
            score = score + (torch.expm1(n * x) / torch.expm1(x)).log()
        if self.evidence is not None:
            score = score + self.attention_weight * self.evidence.score(inputs).clamp(min=ATTENTION_FLOOR).log()
        if self.novelty:
            score = score + self.novelty * KeyDiff().score(inputs)
        return score

    def steps(self, kept: torch.Tensor | None) -> int | torch.Tensor:
        """The lookahead: its steps, or for one per budget, ``[B]`` steps at the budget nearest (in ratio)
        to the fraction ``kept`` ``[B]`` of its tokens each row keeps; without a budget (a threshold, or
        scores looked at outside a selection) the steps of its largest budget."""
        if isinstance(self.lookahead, int):
            return self.lookahead
        fractions = sorted(self.lookahead)
        if kept is None:
            return self.lookahead[fractions[-1]]
        logs = torch.tensor(fractions, dtype=torch.float64, device=kept.device).log()
        nearest = (kept.double().clamp(min=1e-12).log()[:, None] - logs).abs().argmin(-1)
        return torch.tensor([self.lookahead[f] for f in fractions], device=kept.device)[nearest]
