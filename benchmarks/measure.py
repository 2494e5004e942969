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


def run_measured(command: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall seconds and peak anonymous resident memory (MiB) of the whole process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout)
    peak = 0
    while process.poll() is None:
        peak = max(peak, sum(_anonymous_kib(p) for p in _tree(process.pid)))
        time.sleep(0.01)
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
