"""The names results record for the device they were measured on: the CPU's model, a GPU's name.

Light to import: torch is imported inside `describe_device` only."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["cpu_model", "describe_device"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else `platform.processor` or `platform.machine`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_device(device: str | torch.device) -> str:
    """A CUDA device's name, or ``"CPU <model> (<N> threads)"`` (torch's intra-op threads) otherwise; a one-line
    error for a CUDA device when torch sees none."""
    import torch

    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible to torch")
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"
