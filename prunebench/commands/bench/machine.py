"""The machine a ``prunebench bench`` report describes: CPU, threads, versions, GPU, load average.

A ratio is comparable across machines only next to a description of the machine and of its load (a loaded
machine makes every figure noisy). See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from prunebench.hostmem import allocator_state


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, torch threads and version, GPU name, and the load average (noise)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "host_allocator": allocator_state(),
    }
    load = load_average()
    if load is not None:
        info["load_avg_start"] = load
    return info


def load_average() -> float | None:
    """The one-minute load average, rounded (``None`` where the platform has none)."""
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 2)
    return None


def report_name(device: torch.device) -> str:
    """``cpu``, or the GPU model as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
