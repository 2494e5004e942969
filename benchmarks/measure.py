"""Helpers the benchmark scripts share: peak memory of a process tree, the CPU's name."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path


def _anonymous_kib(pid: int) -> int:
    """Proportional anonymous memory: pages a forked worker shares with its parent count once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
    return pids


# Reading smaps_rollup walks a process's page tables: sampled every 10 ms it took a large
# share of this 2-core machine and slowed a 4-slide run from about 18 s to 24 s; every 0.2 s
# it costs little, and the peaks measured (batches, bands, slides) last longer than that.
SAMPLE_SECONDS = 0.2


def run_measured(command: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall seconds and peak anonymous resident memory (MiB) of the whole process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout)
    peak = 0
    while process.poll() is None:
        peak = max(peak, sum(_anonymous_kib(p) for p in _tree(process.pid)))
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}")
    return seconds, peak / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return platform.machine()


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """float32 matrix multiply speed now: this shared machine's speed drifts by a fifth between
    runs, so each benchmark prints it beside its figures."""
    import torch

    a = torch.randn(size, size)
    a @ a
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * size**3 / (time.perf_counter() - started) / 1e9
