#!/usr/bin/env python3
"""Choose the strength of stain augmentation by patient-grouped cross-validation.

usage: python benchmarks/stain_cv.py [--store STORE] [--folds 3] [--jitter 0.05 0.15] [--epochs 12]
       python benchmarks/stain_cv.py --network shipped --jitter 0.05

One val split of 29 patients is a noisy judge of a setting meant to help on new patients'
tissue, so each setting is trained k times, each time holding out a different third of the
patients in STORE (official test patients are never in a fold), and judged on the held-out
patients: balanced accuracy at the best threshold and ROC-AUC, patch alone and with slide
context. By default it uses the compact network so a run takes minutes; `--network shipped`
trains the shipped model's exact settings instead (about 13 min a fold on 2 cores), which
estimates how the shipped model carries to new patients. Prints the mean and worst fold of
each figure, then accuracy, sensitivity and specificity leaving one held-out patient out at a
time (each patient judged at a threshold and context chosen on the other held-out patients:
the nearest thing to a test score without the test patients). Needs the store written by
benchmarks/train_shipped_model.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from train_shipped_model import TRAIN_ARGS as SHIPPED_ARGS

COMPACT_ARGS = ["--arch", "compact", "--arch-kwargs", '{"widths": [16, 32, 48, 64]}', "--seed", "0"]


def network_args(network: str, jitter: float, epochs: int | None) -> list[str]:
    """The training options of `network`, with its stain jitter (and epochs, when given) replaced."""
    options = list(SHIPPED_ARGS if network == "shipped" else COMPACT_ARGS)
    for flag, value in (("--stain-jitter", jitter), ("--epochs", epochs)):
        if value is None:
            continue
        if flag in options:
            del options[options.index(flag):options.index(flag) + 2]
        options += [flag, str(value)]
    return options


def summary(values: list[float]) -> str:
    return f"{np.mean(values):.4f} (min {np.min(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "shipped-model" / "store")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "stain-cv")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--jitter", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--network", choices=["compact", "shipped"], default="compact")
    parser.add_argument("--epochs", type=int, help="default: 12 for compact, the shipped model's own for shipped")
    args = parser.parse_args()
    epochs = args.epochs or (12 if args.network == "compact" else None)
    results: dict[float, list[dict]] = {}
    for jitter in args.jitter:
        for fold in range(1, args.folds + 1):
            out = args.work / f"{args.network}-jitter-{jitter}" / f"fold-{fold}"
            if not (out / "model.json").exists():
                subprocess.run(
                    [sys.executable, "-m", "histoscreen.cli", "train", str(args.store), "--out", str(out), "--quiet",
                     *network_args(args.network, jitter, epochs),
                     "--split-scheme", "kfold", "--folds", str(args.folds), "--fold", str(fold), "--split-seed", "0",
                     "--resume"],
                    check=True,
                )
            validation = json.loads((out / "model.json").read_text())["validation"]
            validation = {**validation["metrics"], "leave_one_patient_out_plain": validation["leave_one_patient_out"]["plain"]}
            results.setdefault(jitter, []).append(validation)
            print(f"jitter {jitter} fold {fold}: balanced accuracy {validation['plain']['balanced_accuracy']:.4f} "
                  f"(context {validation['context_plain']['balanced_accuracy']:.4f})", flush=True)

    options = network_args(args.network, args.jitter[0], epochs)
    del options[options.index("--stain-jitter"):options.index("--stain-jitter") + 2]
    print(f"\n{args.folds}-fold patient-grouped CV over the patients of {args.store} ({' '.join(options)})")
    columns = [("plain", "balanced_accuracy"), ("plain", "roc_auc"), ("context_plain", "balanced_accuracy"), ("context_plain", "roc_auc")]
    print(f"{'HED jitter':>10}" + "".join(f"{mode.replace('_plain', '') + ' ' + name:>28}" for mode, name in columns))
    for jitter, folds in results.items():
        print(f"{jitter:>10}" + "".join(f"{summary([fold[mode][name] for fold in folds]):>28}" for mode, name in columns))

    print("\nLeaving one held-out patient out at a time (threshold and context chosen on the others):")
    names = ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
    print(f"{'HED jitter':>10} {'scoring':>8}" + "".join(f"{name:>22}" for name in names))
    for jitter, folds in results.items():
        for scoring in ("patch", "context"):
            cells = [summary([fold["leave_one_patient_out_plain"][scoring][name] for fold in folds]) for name in names]
            print(f"{jitter:>10} {scoring:>8}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
