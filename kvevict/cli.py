"""``kvevict`` command line: ``kvevict demo``, ``kvevict bench <script> [args]``, ``kvevict calibrate``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
BENCH_HELPERS = {"kvpress_runner"}  # run by kvpress_side inside kvpress's own environment, not commands


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "demo":
        from .demo import main as demo

        demo(rest)
    elif command == "bench":
        found = BENCH_DIR.glob("*.py") if BENCH_DIR.is_dir() else []
        scripts = sorted(p.stem for p in found if p.stem not in BENCH_HELPERS)
        if not rest or rest[0] not in scripts:
            sys.exit(f"usage: kvevict bench {{{','.join(scripts) or 'no bench/ folder: run from a source checkout'}}} [args]")
        sys.argv = [f"kvevict bench {rest[0]}", *rest[1:]]
        runpy.run_path(str(BENCH_DIR / f"{rest[0]}.py"), run_name="__main__")
    elif command == "calibrate":
        script = ROOT / "calibration" / "calibrate.py"
        if not script.exists():
            sys.exit("kvevict calibrate runs calibration/calibrate.py from a source checkout")
        sys.argv = ["kvevict calibrate", *rest]
        runpy.run_path(str(script), run_name="__main__")
    else:
        sys.exit("usage: kvevict {demo,bench,calibrate} [args]   (e.g. kvevict calibrate --help)")


if __name__ == "__main__":
    main()
