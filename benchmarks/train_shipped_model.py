#!/usr/bin/env python3
"""Reproduce the shipped model from the real patches in ../shared/data/idc, in one command.

usage: python benchmarks/train_shipped_model.py [--work DIR] [--install]

The shipped recipe is the one benchmarks/cv.py measures ("with-extra"), with nothing added:
all 143 patients are unpacked and packed into one store (the CV's, .cache/cv/store), and
one `histoscreen train` trains the network on the 82 official train patients and the 32
patients in no official list, picks its best epoch on the 29 official val patients (every
patch: their slides as whole as we have them) and fits its scoring there with train's own
defaults: temperature and bias, the blend slide context, the threshold of highest balanced
accuracy. The CV's fold networks are made by the same command with a fold's split file, and
the CV scores their held-out patients with the scoring `train` stored: what ships is what
was measured. Then the model is evaluated on the val patients (in-sample for its scoring)
and the model card is written from those figures and the CV's results (.cache/cv/seed-0 for
the choices, seed-1 for the confirmation; run cv.py first). --install copies the model,
card and plots into src/histoscreen/models/shipped/.
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
NAME = "idc-residual"

# The network's training options (architecture, epochs, loss, augmentation, seed): cv.py's
# recipes and the shipped model share them.
TRAIN_ARGS = [
    "--arch", "residual",
    "--arch-kwargs", '{"widths": [32, 64, 96], "blocks": [1, 1, 1], "stem": 16}',
    "--epochs", "20",
    "--balance", "weighted",
    "--stain-jitter", "0.05",
    "--seed", "0",
]


def training_command(store: Path, out: Path) -> list[str]:
    """The shipped network: official train + extra patients, epoch and scoring on official val."""
    return [sys.executable, "-m", "histoscreen.cli", "train", str(store), "--out", str(out), *TRAIN_ARGS,
            "--split-scheme", "official", "--extra-to-train", "--resume"]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


MODES = {  # card label: (evaluate options, folder)
    "patch alone": (["--no-context"], "val-plain"),
    "patch alone, dihedral TTA": (["--tta", "--no-context"], "val-tta"),
    "slide context (default)": (["--context"], "val-context"),
    "slide context, dihedral TTA": (["--context", "--tta"], "val-context-tta"),
}


def main() -> None:
    import cv
    from cv_ceiling import ceiling
    from model_card import model_card

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "shipped-model")
    parser.add_argument("--cv", type=Path, default=REPO / ".cache" / "cv", help="cv.py's --work, whose results the card reports")
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    parser.add_argument("--card-only", action="store_true", help="write the card from the evaluations already in --work")
    args = parser.parse_args()
    if not (SHARED / "unpack.py").is_file():
        sys.exit(f"needs the real patches in {SHARED}")
    results = {seed: args.cv / f"seed-{seed}" / "results.json" for seed in (0, 1)}
    missing = [str(path) for path in results.values() if not path.exists()]
    if missing:
        sys.exit(f"the model card reports the cross-validation: run benchmarks/cv.py first ({', '.join(missing)} missing)")
    store = cv.everything_store(args.cv)
    model = args.work / NAME
    if (model / "model.json").exists():
        print(f"{model} is trained already; delete it to train again")
    else:
        run(*training_command(store, model))
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    evaluations = {}
    for mode, (extra, folder) in MODES.items():
        out = args.work / folder
        if not args.card_only:
            run(*histoscreen, "evaluate", str(store), "--model", str(model), "--split", "val", "--out", str(out), "--overwrite", *extra)
        evaluations[mode] = json.loads((out / "metrics.json").read_text())
    metadata = json.loads((model / "model.json").read_text())
    from histoscreen.models.bundle import figures_stamp

    card = model_card(metadata, evaluations, {seed: json.loads(path.read_text()) for seed, path in results.items()},
                      figures_stamp(model), {seed: ceiling(args.cv, seed) for seed in results})
    (args.work / "MODEL_CARD.md").write_text(card)
    print(card)
    if args.install:
        SHIPPED.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "model.safetensors", SHIPPED / f"{NAME}.safetensors")
        shutil.copy(model / "model.json", SHIPPED / f"{NAME}.json")
        (SHIPPED / "MODEL_CARD.md").write_text(card)
        for plot in ("roc.png", "calibration.png", "training_curves.png"):
            shutil.copy(args.work / "val-plain" / plot, SHIPPED / f"val-{plot}")
        shutil.copy(args.work / "val-context" / "roc.png", SHIPPED / "val-context-roc.png")
        print(f"installed into {SHIPPED}")


if __name__ == "__main__":
    main()
