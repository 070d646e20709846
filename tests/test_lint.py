"""Static check of every Python file (library, benchmarks, calibration, tests): undefined names, unused
imports and variables. The benchmark scripts run for an hour on real models, so a name error in them
must be caught here, not at the end of a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="ruff comes with the test extras: pip install -e '.[test]'")
ROOT = Path(__file__).resolve().parent.parent


def test_pyflakes_rules_pass():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "--output-format",
                          "concise", "kvevict", "bench", "calibration", "tests"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
