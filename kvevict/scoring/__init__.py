"""Scorers: each one short file, registered by name in :data:`SCORERS`."""

from .base import Scorer, ScoreInputs, attention_probs
from .criticalkv import CriticalKV
from .dart import DART
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .rand import RandomScorer
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (RandomScorer, StreamingLLM, H2O, SnapKV, TOVA, KNorm, KeyDiff, ExpectedAttention)
}

__all__ = [
    "SCORERS", "CriticalKV", "DART", "ExpectedAttention", "H2O", "KNorm", "KeyDiff", "RandomScorer", "ScoreInputs",
    "Scorer", "SnapKV", "StreamingLLM", "TOVA", "attention_probs",
]
