#!/usr/bin/env python3
"""Choose the strength of stain augmentation by patient-grouped cross-validation.

usage: python benchmarks/stain_cv.py [--store STORE] [--folds 3] [--jitter 0.05 0.15] [--epochs 12]

One val split of 29 patients is a noisy judge of a setting meant to help on new patients'
tissue, so each setting is trained k times, each time holding out a different third of the
patients in STORE (official test patients are never in a fold), and judged on the held-out
patients: balanced accuracy at the best threshold and ROC-AUC, patch alone and with slide
context. Uses the compact network so a run takes minutes; prints a table with the mean and
spread over folds. Needs the store written by benchmarks/train_shipped_model.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = ["--arch", "compact", "--arch-kwargs", '{"widths": [16, 32, 48, 64]}']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "shipped-model" / "store")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "stain-cv")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--jitter", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    results: dict[float, list[dict]] = {}
    for jitter in args.jitter:
        for fold in range(1, args.folds + 1):
            out = args.work / f"jitter-{jitter}" / f"fold-{fold}"
            if not (out / "model.json").exists():
                subprocess.run(
                    [sys.executable, "-m", "histoscreen.cli", "train", str(args.store), "--out", str(out), "--quiet",
                     *ARCHITECTURE, "--epochs", str(args.epochs), "--stain-jitter", str(jitter), "--seed", "0",
                     "--split-scheme", "kfold", "--folds", str(args.folds), "--fold", str(fold), "--split-seed", "0",
                     "--resume"],
                    check=True,
                )
            validation = json.loads((out / "model.json").read_text())["validation"]
            results.setdefault(jitter, []).append(validation)
            print(f"jitter {jitter} fold {fold}: balanced accuracy {validation['plain']['balanced_accuracy']:.4f} "
                  f"(context {validation['context_plain']['balanced_accuracy']:.4f})", flush=True)

    columns = [("plain", "balanced_accuracy"), ("plain", "roc_auc"), ("context_plain", "balanced_accuracy"), ("context_plain", "roc_auc")]
    print(f"\n{args.folds}-fold patient-grouped CV over the patients of {args.store} (compact 16-32-48-64, {args.epochs} epochs, seed 0)")
    print(f"{'HED jitter':>10}" + "".join(f"{mode.replace('_plain', '') + ' ' + name:>28}" for mode, name in columns))
    for jitter, folds in results.items():
        cells = []
        for mode, name in columns:
            values = np.array([fold[mode][name] for fold in folds])
            cells.append(f"{values.mean():.4f} (min {values.min():.4f})")
        print(f"{jitter:>10}" + "".join(f"{cell:>28}" for cell in cells))


if __name__ == "__main__":
    main()
