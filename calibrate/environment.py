"""What a measurement ran on: device, software, threads and how loaded the machine was.

Recorded with every calibration (in the points file and the profile's provenance) because a loaded
2-core box can swing kernel times several-fold; a profile without its environment cannot be judged."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def total_memory_bytes() -> float:
    """Physical memory of the host (Linux /proc/meminfo), else 0."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def load_average() -> tuple[float, float, float]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (float("nan"),) * 3  # type: ignore[return-value]


def collect_environment(device: str, threads: int) -> dict[str, Any]:
    """A flat, YAML-friendly description of the machine and software a calibration runs on."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "device": device,
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "host_memory_bytes": total_memory_bytes(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "load_average_at_start": list(load_average()),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu_name": props.name,
            "gpu_memory_bytes": float(props.total_memory),
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        })
    return env
