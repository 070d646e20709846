"""``kvevict`` command line: ``kvevict demo``, ``kvevict bench <script> [args]``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "demo":
        from .demo import main as demo

        demo(rest)
    elif command == "bench":
        scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py")) if BENCH_DIR.is_dir() else []
        if not rest or rest[0] not in scripts:
            sys.exit(f"usage: kvevict bench {{{','.join(scripts) or 'no bench/ folder: run from a source checkout'}}} [args]")
        sys.argv = [f"kvevict bench {rest[0]}", *rest[1:]]
        runpy.run_path(str(BENCH_DIR / f"{rest[0]}.py"), run_name="__main__")
    else:
        sys.exit("usage: kvevict {demo,bench} [args]   (kvevict demo --help, kvevict bench speed --help)")


if __name__ == "__main__":
    main()
