"""What a run ran on, for policy cards, calibration reports and benchmark tables."""

from __future__ import annotations

import os

import torch


def hardware(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """The machine behind ``device``: the GPU's name (e.g. ``"NVIDIA H200"``), or for the CPU its cores and
    the ``threads`` torch ran on (default: torch's current setting), e.g. ``"2-core CPU (2 threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    return f"{os.cpu_count()}-core CPU ({torch.get_num_threads() if threads is None else threads} threads)"
