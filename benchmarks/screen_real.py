#!/usr/bin/env python3
"""Screening end to end on the real patches: throughput, peak memory, report size, and how
well slide burden follows the true IDC fraction (Spearman across slides).

usage: python benchmarks/screen_real.py [--split val|train|all] [--tta] [--no-context]

Screens the real patches of ../shared/data/idc (unpacked into .cache/real-idc/) as a
Kaggle-layout folder of PNGs, with the shipped model. The val patients were used to pick
the shipped model's epoch, threshold and calibration, so burden agreement on them is a
development figure, not a test result. The baseline is the shipped model's plain
`predict` on the same folder in the same run (no mosaics, heatmaps, explanations or report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from measure import cpu_model, run_measured

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "train", "all"], default="val")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--no-context", action="store_true", help="screen each patch alone (default: with slide context)")
    args = parser.parse_args()
    if not (SHARED / "unpack.py").is_file():
        sys.exit(f"needs the real patches in {SHARED}")
    source = REPO / ".cache" / "real-idc" / args.split
    subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(source), "--split", args.split], check=True, stdout=subprocess.DEVNULL)
    files = sum(1 for _ in source.rglob("*.png"))
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    tta = ["--tta"] if args.tta else []
    (REPO / ".cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as scratch:
        scratch = Path(scratch)
        predict_s, predict_mib = run_measured([*histoscreen, "predict", str(source), "--out", str(scratch / "p.csv"), "--quiet", *tta])
        context = ["--no-context"] if args.no_context else []
        screen_s, screen_mib = run_measured([*histoscreen, "screen", str(source), "--out", str(scratch / "report"), "--quiet", *tta, *context])
        report_mib = sum(p.stat().st_size for p in (scratch / "report").rglob("*") if p.is_file()) / 2**20
        slides = pd.DataFrame(json.loads((scratch / "report" / "slides.json").read_text())["slides"])

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(f"input: real {args.split} patches of ../shared/data/idc, {files:,} PNG files, {len(slides)} slides; "
          f"shipped model{' with TTA' if args.tta else ''}, {'each patch alone' if args.no_context else 'slide context'}")
    print(f"{'variant':40s} {'seconds':>8s} {'patches/s':>10s} {'peak anon MiB':>14s}")
    print(f"{'baseline: predict (CSV only)':40s} {predict_s:8.1f} {files / predict_s:10,.0f} {predict_mib:14.0f}")
    print(f"{'screen (report, heatmaps, Grad-CAM)':40s} {screen_s:8.1f} {files / screen_s:10,.0f} {screen_mib:14.0f}")
    print(f"screen takes {screen_s / predict_s:.2f}x the time of predict; report size {report_mib:.1f} MiB "
          f"({report_mib / max(len(slides), 1):.2f} MiB per slide)")
    rho = spearman(slides["idc_fraction"].to_numpy(), slides["true_idc_fraction"].to_numpy())
    error = (slides["idc_fraction"] - slides["true_idc_fraction"]).abs()
    print(f"slide burden vs true IDC fraction over {len(slides)} slides: Spearman {rho:.3f}, "
          f"mean absolute difference {error.mean():.3f}, median {error.median():.3f}")


if __name__ == "__main__":
    main()
