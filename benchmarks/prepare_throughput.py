#!/usr/bin/env python3
"""Throughput and peak memory of `histoscreen prepare`, against a naive baseline run now.

The baseline is how notebooks commonly load this dataset: one process opens every PNG
with Pillow, appends the array to a list, then stacks the list and saves it, so every
decoded patch is held twice at the end.

usage: python benchmarks/prepare_throughput.py [--source DIR] [--workers N]

Without --source it uses the real train+val patches from ../shared/data/idc (unpacked once
into .cache/real-idc/all), or synthetic slides when ../shared is absent. Each variant runs
in its own process; memory is the peak of the process tree's resident memory, sampled
from /proc every 10 ms as proportional anonymous memory (Pss_Anon: pages shared by
forked workers count once; file pages of the memory-mapped output are not counted).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import cpu_model, run_measured

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"

NAIVE_LOADER = r"""
import sys, numpy as np
from pathlib import Path
from PIL import Image
arrays = []
for path in sorted(Path(sys.argv[1]).rglob("*.png")):
    image = np.asarray(Image.open(path).convert("RGB"))
    padded = np.full((50, 50, 3), 255, np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    arrays.append(padded)
np.save(Path(sys.argv[2]) / "patches.npy", np.stack(arrays))
"""


def default_source(cache: Path) -> tuple[Path, str]:
    if (SHARED / "unpack.py").is_file():
        target = cache / "real-idc" / "all"
        subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(target), "--split", "all"], check=True, stdout=subprocess.DEVNULL)
        return target, "real patches: official train (82 patients) + half of each val patient (29), ../shared/data/idc"
    target = cache / "synthetic-benchmark"
    if not target.exists():
        subprocess.run([sys.executable, "-m", "histoscreen.cli", "synth", str(target), "--patients", "40", "--quiet"], check=True)
    return target, "SYNTHETIC slides (40 patients): ../shared/data/idc is absent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="folder of patch PNGs (default: real data if present)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    source, described = (args.source, str(args.source)) if args.source else default_source(REPO / ".cache")
    files = sum(1 for _ in source.rglob("*.png"))

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(f"input: {described}: {files:,} PNG files in {source}")
    print(f"{'variant':52s} {'seconds':>8s} {'files/s':>9s} {'patches/s':>10s} {'peak anon MiB':>14s}")
    scratch_parent = REPO / ".cache" if (REPO / ".cache").is_dir() else None
    with tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        scratch = Path(scratch)
        doubled = scratch / "doubled"
        for path in source.rglob("*.png"):
            for root in (doubled, doubled / "IDC_regular_ps50_idx5"):
                (root / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                os.link(path, root / path.relative_to(source))
        for layout, folder in (("one copy", source), ("Kaggle archive shape, every file twice", doubled)):
            read = files * (2 if folder == doubled else 1)
            (scratch / "naive").mkdir()
            naive_s, naive_mib = run_measured([sys.executable, "-c", NAIVE_LOADER, str(folder), str(scratch / "naive")])
            ours_s, ours_mib = run_measured(
                [sys.executable, "-m", "histoscreen.cli", "prepare", str(folder), str(scratch / "store"),
                 "--quiet", "--workers", str(args.workers)]
            )
            store_mib = sum(p.stat().st_size for p in (scratch / "store").iterdir()) / 2**20
            shutil.rmtree(scratch / "naive")
            shutil.rmtree(scratch / "store")
            print(f"{layout}:")
            for name, seconds, mib in (
                ("  baseline: one process, list then np.stack", naive_s, naive_mib),
                (f"  histoscreen prepare, {args.workers} workers", ours_s, ours_mib),
            ):
                print(f"{name:52s} {seconds:8.1f} {read / seconds:9,.0f} {files / seconds:10,.0f} {mib:14.0f}")
            print(f"  speed-up over baseline {naive_s / ours_s:.2f}x; peak memory {ours_mib / naive_mib:.2f}x the baseline's")
    print(f"store size on disk: {store_mib:.0f} MiB for {files:,} patches (decoded pixels alone: {files * 7500 / 2**20:.0f} MiB)")
    print("(the baseline keeps both copies of a doubled archive; prepare keeps one)")


if __name__ == "__main__":
    main()
