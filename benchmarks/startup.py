#!/usr/bin/env python3
"""How long the command line takes to answer: `histoscreen --help`, `predict --help` and a
one-patch `predict` (the ONNX path, graph cached), next to `python -c pass` and to
`python -c "import torch"`, all measured in this run on this machine.

usage: python benchmarks/startup.py [--repeats 5]

Targets (issue 24): `--help` within 0.5 s of `python -c pass`; a one-patch `predict` within
2 s. Each figure is the median of --repeats runs, after one unmeasured run that warms the
file cache and the ONNX graph cache.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from measure import cpu_model


def median_seconds(command: list[str], repeats: int, env: dict | None = None) -> float:
    subprocess.run(command, check=True, capture_output=True, env=env)  # warm caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "histoscreen.cli"]
    with tempfile.TemporaryDirectory() as folder:
        patch = Path(folder) / "9999_idx5_x51_y51_class0.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(patch)
        rows = [
            ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ("python -c 'import torch' (reference)", [sys.executable, "-c", "import torch"]),
            ("histoscreen --help", cli + ["--help"]),
            ("histoscreen predict --help", cli + ["predict", "--help"]),
            ("histoscreen predict (1 patch, ONNX)", cli + ["predict", "-q", str(patch), "--out", f"{folder}/out.csv", "--overwrite"]),
        ]
        print(f"{cpu_model()}, median of {args.repeats} runs each")
        seconds = {name: median_seconds(command, args.repeats) for name, command in rows}
    baseline = seconds["python -c pass (baseline)"]
    for name, value in seconds.items():
        print(f"{name:40s} {value:6.2f} s   {value - baseline:+6.2f} s over the baseline")
    help_over = seconds["histoscreen --help"] - baseline
    predict = seconds["histoscreen predict (1 patch, ONNX)"]
    print(f"target --help within 0.5 s of the baseline: {help_over:.2f} s, {'met' if help_over <= 0.5 else 'NOT met'}")
    print(f"target one-patch predict within 2 s: {predict:.2f} s, {'met' if predict <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
