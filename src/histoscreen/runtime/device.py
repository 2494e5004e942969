"""Which device runs the model, how many CPU threads it may use, and how to describe the
machine in a provenance record.

torch is imported only where a question needs it: on a machine with no NVIDIA driver,
'auto' is the CPU without asking torch, so the ONNX path never pays torch's start-up.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from histoscreen.errors import SettingError

if TYPE_CHECKING:
    import torch

_threads: int | None = None


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU; otherwise any torch device string."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SettingError("device", f"{requested!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"{requested!r} was asked for but this machine has no CUDA device")
    return device


def device_name(requested: str = "auto") -> str:
    """pick_device's answer as a string ('cpu', 'cuda', 'cuda:1'), without importing torch
    where the answer is the CPU anyway."""
    if requested == "cpu" or (requested == "auto" and not _may_have_cuda()):
        return "cpu"
    return str(pick_device(requested))


def _may_have_cuda() -> bool:
    """False only where CUDA surely is not: Linux without the NVIDIA driver, or macOS."""
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
    return True


def set_threads(count: int) -> None:
    """One CPU thread budget for torch and ONNX Runtime, process-wide: set at an entry point
    (the CLI's --threads, a Ray actor's share), never inside the library."""
    global _threads
    _threads = count
    os.environ["OMP_NUM_THREADS"] = str(count)  # torch, if imported later, starts with it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


def thread_budget() -> int:
    """The budget set_threads gave, else torch's own choice if torch runs here; 0 means the
    runtime's own default (ONNX Runtime, like torch, takes the physical cores)."""
    if _threads:
        return _threads
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return 0


def machine_description(device: torch.device | str) -> str:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = thread_budget()
    return f"{model_name}, {os.cpu_count()} cores, {threads or 'default'} threads"
