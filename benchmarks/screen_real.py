#!/usr/bin/env python3
"""Screening end to end on the real patches: throughput, peak memory, report size, and how
well slide burden follows the true IDC fraction (Spearman across slides).

usage: python benchmarks/screen_real.py [--split val-full|val|train|extra|everything] [--tta] [--no-context]

Screens the real patches of ../shared/data/idc (unpacked into .cache/real-idc/) as a
Kaggle-layout folder of PNGs, with the shipped model. "val-full" is every patch of the 29
official val patients (their slides as whole as we have them); the shipped network never
trained on them, but they picked its epoch and its scoring was fitted on them, so burden
agreement there is a development figure, not a test result (benchmarks/cv.py gives the
estimate for new patients). The train and extra patients were trained on. Slide figures
(scoring/slides.py): burden against the true IDC fraction over every slide and over the
complete ones, and the IDC slides under-called. The baseline is the shipped model's plain
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


def unpack(split: str) -> Path:
    source = REPO / ".cache" / "real-idc" / split
    for part in ("val", "val-rest") if split == "val-full" else (split,):
        subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(source), "--split", part], check=True, stdout=subprocess.DEVNULL)
    return source


def complete_of(source: Path) -> dict[str, bool]:
    """Which slides of a Kaggle-layout folder are complete, from the patch names."""
    from histoscreen.data import SlidePositions
    from histoscreen.data.naming import parse_patch_name
    from histoscreen.scoring.slides import complete_slides

    parsed = [parse_patch_name(path.name) for path in source.rglob("*.png")]
    parsed = [p for p in parsed if p is not None]
    positions = SlidePositions.of([p.patient for p in parsed], [p.x for p in parsed], [p.y for p in parsed])
    return complete_slides(positions, np.array([p.label for p in parsed]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val-full", "val", "train", "extra", "everything"], default="val-full")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--no-context", action="store_true", help="screen each patch alone (default: with slide context)")
    args = parser.parse_args()
    if not (SHARED / "unpack.py").is_file():
        sys.exit(f"needs the real patches in {SHARED}")
    source = unpack(args.split)
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
    print(f"{'screen (report, heatmaps, explanations)':40s} {screen_s:8.1f} {files / screen_s:10,.0f} {screen_mib:14.0f}")
    print(f"screen takes {screen_s / predict_s:.2f}x the time of predict; report size {report_mib:.1f} MiB "
          f"({report_mib / max(len(slides), 1):.2f} MiB per slide)")
    from histoscreen.scoring.slides import SlideBurden, slide_figures

    complete = complete_of(source)
    burdens = [SlideBurden(str(row.patient), row.true_idc_fraction, row.idc_fraction) for row in slides.itertuples()]
    for name, chosen in (("every slide", burdens), ("complete slides", [b for b in burdens if complete[b.slide]])):
        figures = slide_figures(chosen)
        print(f"slide burden vs true IDC fraction, {name} ({figures['slides']}, {figures['idc_slides']} with IDC fraction >= 0.20): "
              f"Spearman {figures['spearman']:.3f}, mean absolute difference {figures['burden_mae']:.3f}; "
              f"IDC slides under-called: {', '.join(figures['under_called']) or 'none'}")


if __name__ == "__main__":
    main()
