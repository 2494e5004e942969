#!/usr/bin/env python3
"""Reproduce the shipped model from the real patches in ../shared/data/idc, in one command.

usage: python benchmarks/train_shipped_model.py [--work DIR] [--install]

Unpacks the official train patients and half of each official val patient, packs them,
trains on the train patients (selection, threshold and calibration on the val patients
only; test patients are never seen), evaluates on the val patients with and without
dihedral TTA, and writes a model card. With --install the model and its card are copied
into src/histoscreen/models/shipped/, which is how the shipped model was made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"
SHIPPED = REPO / "src" / "histoscreen" / "models" / "shipped"
NAME = "idc-compact"

# The settings of the shipped model (see MODEL_CARD.md for how they were chosen).
TRAIN_ARGS = [
    "--arch", "compact",
    "--arch-kwargs", '{"widths": [16, 32, 48, 64]}',
    "--epochs", "14",
    "--balance", "weighted",
    "--stain-jitter", "0.05",
    "--seed", "0",
]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def model_card(metadata: dict, evaluations: dict[str, dict]) -> str:
    training = metadata["training"]
    norm = metadata["normalisation"]
    rows = []
    for mode, report in evaluations.items():
        m, ci = report["metrics"], report["confidence_95"]
        rows.append(
            f"| {mode} | {report['threshold']:.4f} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} "
            f"({ci['balanced_accuracy'][0]:.3f}-{ci['balanced_accuracy'][1]:.3f}) | {m['sensitivity']:.4f} | "
            f"{m['specificity']:.4f} | {m['f1']:.4f} | {m['roc_auc']:.4f} ({ci['roc_auc'][0]:.3f}-{ci['roc_auc'][1]:.3f}) | "
            f"{m['ece']:.4f} |"
        )
    return f"""# Model card: {NAME}

The model `histoscreen predict` and `screen` use when no `--model` is given. A screening
aid for invasive ductal carcinoma (IDC) in 50x50 px H&E patches of breast tissue (the
Kaggle "Breast Histopathology Images" set); not a diagnosis.

## Architecture and input
- `{metadata['architecture']}` with {json.dumps(metadata['architecture_kwargs'])}: {training['parameters']:,} parameters,
  {training['flops_per_patch'] / 1e6:.1f} MFLOPs per patch (conv and linear, x2 for multiply-add).
- Input: RGB uint8 patch, edge patches padded with white to 50x50, scaled to [0, 1], then
  normalised with mean {norm['mean']} and std {norm['std']} (measured on the train patches).
- Output: one logit; `prob_idc = sigmoid(logit / T + b)`, IDC when `prob_idc >= threshold`.

| mode | temperature T | bias b | threshold |
|---|---:|---:|---:|
| plain | {metadata['temperature']:.4f} | {metadata['bias']:.4f} | {metadata['threshold']:.4f} |
| dihedral TTA (`--tta`) | {metadata['tta_temperature']:.4f} | {metadata['tta_bias']:.4f} | {metadata['tta_threshold']:.4f} |

Threshold rule: {metadata['validation']['threshold_rule']}, chosen on the val patients.

## Training data
- Train: {len(training['train_patients'])} official train patients (Janowczyk & Madabhushi 2016 lists; 8915 and 9024
  are missing from the recovered data), {training['train_patches']:,} patches, {training['train_idc_patches']:,} IDC.
- Selection, calibration and threshold: {len(training['val_patients'])} official val patients, the half of each
  patient's recovered patches in ../shared ({training['val_patches']:,} patches, {training['val_idc_patches']:,} IDC).
- Test patients: never seen, never used for any choice.
- Augmentation: the 8 dihedral transforms, HED stain jitter, mild brightness and contrast.
- Best epoch {training['best_epoch']} of {training['config']['epochs']} by val balanced accuracy.

## How it was made
- Command: `{training['command']}` (via `python benchmarks/train_shipped_model.py --install`), seed {training['config']['seed']}.
- Training time: {training['seconds'] / 60:.1f} min on {training['machine']} (torch {training['torch']}).

## Validation results (official val patients, half of each; the threshold was chosen here, so expect test to be lower)
95% intervals from 1000 patient bootstrap resamples.

| mode | threshold | accuracy | balanced accuracy (95% CI) | sensitivity | specificity | F1 | ROC-AUC (95% CI) | ECE |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

## What was tried (same data, same val patients, seed 0, this 2-core machine)
| run | val balanced accuracy | val ROC-AUC | val sensitivity / specificity | MFLOPs | training |
|---|---:|---:|---:|---:|---:|
| compact 16-32-48-64, weighted loss, 14 epochs (shipped) | 0.893 | 0.956 | 0.902 / 0.883 | 18 | 7 min |
| same, balanced sampling instead of a weighted loss | 0.893 | 0.953 | 0.903 / 0.882 | 18 | 7 min |
| residual 32-64-96 (one block per stage), weighted, 20 epochs | 0.898 | 0.960 | 0.922 / 0.873 | 54 | 25 min |
| the same residual network with dihedral TTA | 0.900 | 0.963 | 0.911 / 0.889 | 54 x 8 | |

Weighted loss and balanced sampling tie, so the simpler weighted loss stays the default.
The residual network gains half a point of balanced accuracy for three times the FLOPs
(and the fast CPU path needs few FLOPs), so the compact network ships. None of these
reaches the project's val targets (accuracy 0.92, sensitivity and specificity 0.90,
ROC-AUC 0.96 together): specificity is what falls short, as the issue foresaw. Not yet
tried: longer schedules, stronger stain augmentation or stain normalisation chosen by
patient-grouped cross-validation, ensembles, wider networks.

For comparison, published patient-level results on the official test patients: balanced
accuracy 0.847 and F1 0.765 (Janowczyk & Madabhushi 2016), balanced accuracy 0.890 (Romero
et al. 2019). These are val figures, not test figures, and are not directly comparable.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "shipped-model")
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    args = parser.parse_args()
    if not (SHARED / "unpack.py").is_file():
        sys.exit(f"needs the real patches in {SHARED}")
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    patches, store, model, work = REPO / ".cache" / "real-idc" / "all", args.work / "store", args.work / "model", args.work
    run(sys.executable, str(SHARED / "unpack.py"), str(patches), "--split", "all")
    if not store.exists():
        run(*histoscreen, "prepare", str(patches), str(store))
    if (model / "model.safetensors").exists():
        print(f"{model} is trained already; delete it to train again")
    else:
        run(*histoscreen, "train", str(store), "--out", str(model), *TRAIN_ARGS, "--resume")
    evaluations = {}
    for mode, extra in (("plain", []), ("dihedral TTA", ["--tta"])):
        out = work / f"val-{'tta' if extra else 'plain'}"
        run(*histoscreen, "evaluate", str(store), "--model", str(model), "--split", "val", "--out", str(out), "--overwrite", *extra)
        evaluations[mode] = json.loads((out / "metrics.json").read_text())
    metadata = json.loads((model / "model.json").read_text())
    card = model_card(metadata, evaluations)
    (work / "MODEL_CARD.md").write_text(card)
    print(card)
    if args.install:
        SHIPPED.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "model.safetensors", SHIPPED / f"{NAME}.safetensors")
        shutil.copy(model / "model.json", SHIPPED / f"{NAME}.json")
        (SHIPPED / "MODEL_CARD.md").write_text(card)
        for plot in ("roc.png", "calibration.png", "training_curves.png"):
            shutil.copy(work / "val-plain" / plot, SHIPPED / f"val-{plot}")
        print(f"installed into {SHIPPED}")


if __name__ == "__main__":
    main()
