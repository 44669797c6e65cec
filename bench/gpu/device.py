"""The device the benchmark runs on: its description for the report, and torch's sync and free."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import subprocess
from typing import Any

import torch

from bench.common import cpu_name, ml_versions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def env_info(device: torch.device) -> dict[str, Any]:
    """The machine, the library versions and, on CUDA, the GPU, its memory, driver and CUDA."""
    info: dict[str, Any] = {
        "device": str(device),
        **ml_versions(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        info.update(_gpu_info(device))
    return info


def _gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "capability": f"{props.major}.{props.minor}",
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return info
