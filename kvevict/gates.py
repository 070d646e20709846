"""Retention gates: small per-layer networks scoring each KV entry when it is created.

``log beta = logsigmoid(shared(phi(W2 phi(W1 h + b1) + b2)))`` per KV head, from the layer's
attention input ``h`` (after the input norm). ``shared`` is ONE projection for all layers: it puts
every layer, head and modality on one scale, so a single global budget can decide who stays.
An entry created at position ``i`` is worth ``(t + 1 - i) log beta_i`` at step ``t`` (geometric decay).

Gates are saved as safetensors + a JSON card naming the model they were calibrated for; loading
them for another model is an error. Pickles are never loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from .selection import make_allocator

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
POLICY_PATH_ENV = "KVEVICT_POLICIES"  # folders (os.pathsep-separated) searched for a card before POLICY_DIR
DEFAULT_ALLOCATOR = "global-balanced"  # of gates whose calibration checked no held-out text


@dataclass(frozen=True)
class Fingerprint:
    """What a calibrated policy must match in a model."""

    architecture: str
    layers: int
    kv_heads: int
    hidden_size: int
    full_layers: tuple[int, ...]

    @classmethod
    def of(cls, config: PretrainedConfig) -> "Fingerprint":
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        return cls(
            architecture=text.model_type,
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            hidden_size=text.hidden_size,
            full_layers=tuple(i for i, t in enumerate(types) if t == "full_attention"),
        )


@dataclass
class Card:
    """The JSON card shipped next to calibrated gates."""

    model: str
    fingerprint: Fingerprint
    width: int
    method: str
    data: str
    target_budget: int
    steps: int
    seconds: float
    metrics: dict = field(default_factory=dict)
    allocator: str = DEFAULT_ALLOCATOR  # chosen on held-out text at the end of calibration
    lookahead: int | dict[str, int] = 0  # the learned score's (steps, 0: none), or steps per budget fraction
    novelty: float = 0.0  # the weight of KeyDiff's signal in the learned score (0: none)

    def write(self, path: Path) -> None:
        """Write the card as JSON to ``path``."""
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")


class RetentionGates(nn.Module):
    """Gates for the full-attention layers of one model. ``forward(h [B, q, D], layer_idx)`` gives
    ``log beta`` ``[B, H, q]`` (<= 0); :meth:`forward_layers` scores several layers in one batched pass.

    The per-layer MLPs are stored stacked (``w1`` ``[L, D, W]``, ``b1`` ``[L, W]``, ``w2`` ``[L, W, W]``,
    ``b2`` ``[L, W]``; ``L`` = full-attention layers), so decoding can score every layer with three
    batched matrix products instead of ``3 L`` small ones.
    """

    def __init__(self, fingerprint: Fingerprint, width: int = 128, init_bias: float = 10.0) -> None:
        super().__init__()
        self.fingerprint, self.width = fingerprint, width
        self.index = {layer: i for i, layer in enumerate(fingerprint.full_layers)}
        n, d = len(fingerprint.full_layers), fingerprint.hidden_size

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default initialisation
            return nn.Parameter(torch.empty(*shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))

        self.w1, self.b1 = uniform(n, d, width, fan_in=d), uniform(n, width, fan_in=d)
        self.w2, self.b2 = uniform(n, width, width, fan_in=width), uniform(n, width, fan_in=width)
        self.shared = nn.Linear(width, fingerprint.kv_heads)
        nn.init.normal_(self.shared.weight, std=1e-3)
        nn.init.constant_(self.shared.bias, init_bias)

    def forward(self, hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return self.forward_layers([hidden], [layer_idx])[0]

    def forward_layers(self, hidden: list[torch.Tensor], layers: list[int]) -> list[torch.Tensor]:
        """``log beta`` ``[B, H, q]`` for each ``hidden`` ``[B, q, D]`` of the (same-shaped) ``layers``."""
        return list(F.logsigmoid(self._logits(hidden, layers)).unbind(0))

    def logits_layers(self, hidden: list[torch.Tensor], layers: list[int]) -> list[torch.Tensor]:
        """The logits behind :meth:`forward_layers` (``log beta = logsigmoid(logit)``), ``[B, H, q]`` each."""
        return list(self._logits(hidden, layers).unbind(0))

    def _logits(self, hidden: list[torch.Tensor], layers: list[int]) -> torch.Tensor:
        """Logits ``[L, B, H, q]`` of the ``L`` layers."""
        idx = [self.index[layer] for layer in layers]
        if idx == list(range(idx[0], idx[0] + len(idx))):  # consecutive (one layer, or all): views, no copy
            idx = slice(idx[0], idx[0] + len(idx))
        else:
            idx = torch.tensor(idx, device=self.w1.device)
        w1, b1, w2, b2 = self.w1[idx], self.b1[idx], self.w2[idx], self.b2[idx]
        x = torch.stack(hidden).flatten(1, 2).to(w1.dtype)  # [L, B q, D]
        x = F.silu(torch.baddbmm(b1[:, None], x, w1))
        x = F.silu(torch.baddbmm(b2[:, None], x, w2))
        return self.shared(x).view(len(layers), *hidden[0].shape[:-1], -1).transpose(2, 3)

    def save(self, directory: Path, card: Card) -> Path:
        """Write ``<model>.safetensors`` (float16 weights) and ``<model>.json`` into ``directory``; return
        the card path."""
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().half().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, directory / f"{card.model}.safetensors")
        path = directory / f"{card.model}.json"
        card.write(path)
        return path


def policy_folders() -> list[Path]:
    """The folders searched for a model's card, in order: those named in ``$KVEVICT_POLICIES``
    (separated by ``os.pathsep``; each must exist), then the shipped ``policies/`` if present."""
    named = [Path(p) for p in os.environ.get(POLICY_PATH_ENV, "").split(os.pathsep) if p]
    for folder in named:
        if not folder.is_dir():
            raise ValueError(f"{POLICY_PATH_ENV} names {folder}, which is not a folder")
    return named + [POLICY_DIR] * POLICY_DIR.is_dir()


def load_gates(config: PretrainedConfig, path: str | Path | None = None) -> tuple[RetentionGates, Card]:
    """Load calibrated gates for the model of ``config``: from the card at ``path``, or the card whose
    fingerprint matches in the first of :func:`policy_folders` that holds one. Raises if none matches,
    or if one folder holds several matching cards."""
    want = Fingerprint.of(config)
    if path is not None:
        return _load(Path(path), _read_card(Path(path)), want)
    folders = policy_folders()
    if not folders:
        raise ValueError(f"no policies folder at {POLICY_DIR}: the shipped policies live in the source checkout "
                         f"(install it with `pip install -e .`); name a folder of cards in {POLICY_PATH_ENV}, "
                         "or pass the path of a policy's card")
    for folder in folders:
        cards = {p: _read_card(p) for p in sorted(folder.glob("*.json"))}
        found = [p for p, raw in cards.items() if _is_card(raw) and _fingerprint(raw) == want]
        if len(found) > 1:
            raise ValueError(f"several cards in {folder} match this model ({', '.join(p.name for p in found)}); "
                             "keep one there, or pass the path of the card to use")
        if found:
            return _load(found[0], cards[found[0]], want)
    raise ValueError(f"no calibrated policy in {', '.join(map(str, folders))} matches this model ({want}); "
                     "run `kvevict calibrate`")


def _read_card(card_path: Path) -> dict:
    """The JSON at ``card_path`` (a card has a ``fingerprint``; other JSON files in a folder are skipped)."""
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{card_path} is not valid JSON ({e})") from None


def _is_card(raw: object) -> bool:
    """Whether JSON ``raw`` is a policy card (other JSON files may share a folder with cards)."""
    return isinstance(raw, dict) and "fingerprint" in raw


def _fingerprint(raw: dict) -> Fingerprint:
    """The fingerprint recorded in a card's JSON ``raw``."""
    return Fingerprint(**{**raw["fingerprint"], "full_layers": tuple(raw["fingerprint"]["full_layers"])})


def _load(card_path: Path, raw: dict, want: Fingerprint) -> tuple[RetentionGates, Card]:
    """The gates of the card ``raw`` read from ``card_path``, refused unless calibrated for ``want``."""
    if not _is_card(raw):
        raise ValueError(f"{card_path} is not a policy card (it has no fingerprint)")
    fp = _fingerprint(raw)
    if fp != want:
        raise ValueError(f"{card_path.name} was calibrated for {fp}, not for this model ({want})")
    try:
        card = Card(**{**raw, "fingerprint": fp})
    except TypeError as e:  # a field missing or unknown
        raise ValueError(f"{card_path} is not a valid policy card: {e}") from None
    try:
        make_allocator(card.allocator)
    except ValueError as e:
        raise ValueError(f"{card_path} names an {e}") from None  # "unknown allocator ..."
    gates = RetentionGates(fp, width=card.width)
    gates.load_state_dict(load_file(card_path.with_suffix(".safetensors")))  # float16 -> float32 params
    return gates.eval(), card
