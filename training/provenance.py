"""What a card records about where a run ran: the machine, library versions and the CPU load."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    """CPU model, core and torch thread counts, platform and Python version (no GPU: training runs on CPUs)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions() -> dict[str, str]:
    """torch's version, and torchvision's when installed."""
    out = {"torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import torchvision  # optional: only the detection models need it

        out["torchvision"] = torchvision.__version__
    return out


def load_average() -> float | None:
    """The 1-min load average (None where the OS has none): the CPUs may be shared with other jobs."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
