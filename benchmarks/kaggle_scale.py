#!/usr/bin/env python3
"""prepare, predict and screen at the full Kaggle set's size (277,524 patches), and at a
quarter of it: time and peak memory, to show memory stays bounded as the input grows.

usage: python benchmarks/kaggle_scale.py [--patches 277524] [--baseline-fraction 0.25] [--work DIR]

The patches are SYNTHETIC (histoscreen synth's slides, cut into patches and dealt out to 279
pseudo-patients laid out on 50-px grids like the real set), written as a Kaggle-layout PNG
folder; no figure here says anything about accuracy. Each step runs as its own process with
the shipped model (ONNX Runtime on the CPU) and slide context, and its peak memory is the
proportional anonymous memory of its whole process tree (workers included). The quarter-size
run is the baseline: the last columns give full / quarter for time and memory.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from measure import cpu_model, run_measured

REPO = Path(__file__).resolve().parents[1]
KAGGLE_PATCHES, KAGGLE_PATIENTS = 277_524, 279


def patch_pool(slides: int = 12) -> list[tuple[bytes, int]]:
    """PNG bytes and label of every patch of a few synthetic slides."""
    from histoscreen.data import generate_slide

    pool = []
    for index in range(slides):
        for name, pixels in generate_slide(index, seed=7).patches():
            buffer = BytesIO()
            Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
            pool.append((buffer.getvalue(), name.label))
    return pool


def write_folder(folder: Path, patches: int, patients: int, pool: list[tuple[bytes, int]]) -> None:
    """`patches` patches dealt out to `patients` pseudo-patients, each a square-ish slide."""
    if folder.exists():
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    written = 0
    for number in range(patients):
        count = patches // patients + (number < patches % patients)
        patient = str(900000 + number)
        columns = math.ceil(math.sqrt(count * 1.3))
        for label in (0, 1):
            (partial / patient / str(label)).mkdir(parents=True, exist_ok=True)
        for cell in range(count):
            data, label = pool[(written + cell) % len(pool)]
            x, y = (cell % columns) * 50 + 1, (cell // columns) * 50 + 1
            (partial / patient / str(label) / f"{patient}_idx5_x{x}_y{y}_class{label}.png").write_bytes(data)
        written += count
    partial.rename(folder)


def measure_size(work: Path, patches: int, pool) -> dict[str, tuple[float, float]]:
    folder, store = work / f"patches-{patches}", work / f"store-{patches}"
    patients = max(1, round(KAGGLE_PATIENTS * patches / KAGGLE_PATCHES))
    write_folder(folder, patches, patients, pool)
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    results = {}
    shutil.rmtree(store, ignore_errors=True)
    results["prepare (PNG folder -> store)"] = run_measured([*histoscreen, "prepare", str(folder), str(store), "-q"])
    results["predict --context (store -> CSV)"] = run_measured(
        [*histoscreen, "predict", str(store), "--context", "--out", str(work / f"preds-{patches}.csv"), "--overwrite", "-q"]
    )
    results["screen (store -> report)"] = run_measured(
        [*histoscreen, "screen", str(store), "--out", str(work / f"report-{patches}"), "--overwrite", "-q"]
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=KAGGLE_PATCHES)
    parser.add_argument("--baseline-fraction", type=float, default=0.25)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "kaggle-scale")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pool = patch_pool()
    small = max(1000, round(args.patches * args.baseline_fraction))
    baseline = measure_size(args.work, small, pool)
    full = measure_size(args.work, args.patches, pool)
    print(f"SYNTHETIC patches in the Kaggle layout; shipped model, slide context; {cpu_model()}")
    print(f"{'step':36} {'patches':>9} {'seconds':>8} {'patches/s':>10} {'peak MiB':>9}   x time  x memory (vs {small:,})")
    for step in full:
        for size, results in ((small, baseline), (args.patches, full)):
            seconds, peak = results[step]
            ratios = ""
            if size == args.patches:
                ratios = f"  {seconds / baseline[step][0]:6.2f}  {peak / baseline[step][1]:8.2f}"
            print(f"{step:36} {size:>9,} {seconds:8.1f} {size / seconds:10,.0f} {peak:9.0f} {ratios}")


if __name__ == "__main__":
    main()
