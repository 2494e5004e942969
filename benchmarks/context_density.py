#!/usr/bin/env python3
"""How slide context depends on how many neighbours a patch has, on the real val patients.

usage: python benchmarks/context_density.py [--model MODEL] [--store STORE] [--seeds 5]

Keeps a random fraction of every patch of the official val patients (1, 1/2, 1/3, 1/4;
several seeds: partial slides, as half the patients anyone holds are) and measures
patch-alone and slide-context calls at the model's stored thresholds: how the context's
gain depends on how much of a slide is there. Needs a store holding every patch of the val
patients (the one benchmarks/cv.py and train_shipped_model.py write, the default). The val
patients picked the shipped model's epoch and scoring: in-sample figures, for the trend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from histoscreen.data.splits import official_split
from histoscreen.data.store import PatchStore
from histoscreen.data import SlidePositions
from histoscreen.runtime import Predictor, machine_description
from histoscreen.scoring.context import neighbour_means
from histoscreen.scoring.metrics import classification_metrics

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the shipped model")
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "cv" / "store")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    store = PatchStore(args.store)
    rows = store.rows_of(official_split(store.patients).val)
    index = store.index.iloc[rows].reset_index(drop=True)
    labels = index["label"].to_numpy()
    alone = Predictor(args.model, context=False)
    context = Predictor(args.model, context=True)
    logits = alone.patch_logits(np.ascontiguousarray(store.patches[rows]))
    print(f"{len(rows):,} val patches of {index['patient'].nunique()} official val patients; model {alone.model_path.name}; "
          f"{machine_description(alone.device)}")
    print(f"{'kept':>6} {'neighbours':>10}  {'scoring':14}" + "".join(f"{name:>19}" for name in FIGURES))
    for kept in (1.0, 0.5, 1 / 3, 0.25):
        results = {"patch alone": [], "slide context": []}
        neighbours = []
        for seed in range(1 if kept == 1.0 else args.seeds):
            chosen = np.random.default_rng(seed).random(len(rows)) < kept
            part = index[chosen]
            positions = SlidePositions.of(part["patient"].tolist(), part["x"].tolist(), part["y"].tolist())
            neighbours.append(neighbour_means(logits[chosen], positions, context.metadata.scoring.context.radius)[1].mean())
            for name, predictor in (("patch alone", alone), ("slide context", context)):
                metrics = classification_metrics(labels[chosen], predictor.finish(logits[chosen], positions), predictor.threshold)
                results[name].append([metrics[figure] for figure in FIGURES])
        for name, values in results.items():
            means = np.mean(values, axis=0)
            print(f"{kept:6.2f} {np.mean(neighbours):10.1f}  {name:14}" + "".join(f"{value:19.4f}" for value in means))


if __name__ == "__main__":
    main()
