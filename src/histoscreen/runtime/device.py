"""Which device runs the model, and how to describe the machine in a provenance record."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from histoscreen.errors import SettingError


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU; otherwise any torch device string."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SettingError("device", f"{requested!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"{requested!r} was asked for but this machine has no CUDA device")
    return device


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
