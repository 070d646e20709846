"""Scorers: each one short file, registered by name in :data:`SCORERS`."""

from .base import Scorer, ScoreInputs
from .streaming import StreamingLLM

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (StreamingLLM,)}

__all__ = ["SCORERS", "Scorer", "ScoreInputs", "StreamingLLM"]
