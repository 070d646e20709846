"""Peak resident memory of this process, resettable so that one process can measure run after run.

Standard library only: ``bench/kvpress_runner.py`` loads this file by path inside kvpress's environment.
"""

from __future__ import annotations


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (Linux ``clear_refs``; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MiB) since :func:`reset_peak_rss` (Linux; ``None`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
