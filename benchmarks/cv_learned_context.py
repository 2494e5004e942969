#!/usr/bin/env python3
"""Learned slide context, through the same patient-grouped CV as benchmarks/cv.py: can a
model of the neighbourhood's scores beat today's fixed blend with the neighbours' mean?

usage: python benchmarks/cv_learned_context.py [CANDIDATE] [--work .cache/cv]

Reads the out-of-fold logits cv.py cached for CANDIDATE (run cv.py CANDIDATE first). For
each fold, a context model is fitted on the OTHER folds' held-out patients (their logits
came from models that never trained on them, as a new patient's would) and applied to this
fold's patients; the threshold is then chosen per held-out patient on the other patients
of its fold, exactly as in cv.py. Context models:

- blend: the earlier shipped scoring (radius and weight chosen on the other folds);
- learned: the shipped learned context, the product's own code (scoring/context.py): a
  logistic regression on the patch's calibrated logit, the neighbours' mean logit and how
  many there are at radii 1, 2, 3, 5, 8, the 3x3 max and min, the 5x5 spread, and the
  slide's median, 10th and 90th percentile and share above even odds; the calibration too
  is fitted on the other folds;
- CNN: a 3-layer CNN (16 channels) on the 11 x 11 window of logits and presence mask,
  trained 6 epochs with dihedral flips; CNN+blend: the sum of its logit and the blend's.
Only the plain (one view) logits are used: the default path's. Prints mean (worst fold)
for every threshold rule of cv.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv import REPO, RULES, Fold, fold_logits, full_store  # noqa: E402

WINDOW_RADIUS = 5


def slide_cells(fold: Fold, patient: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.flatnonzero(fold.patients == patient)
    return rows, fold.ys[rows] // 50, fold.xs[rows] // 50


def windows(fold: Fold, radius: int) -> np.ndarray:
    """Per patch: the (2r+1)^2 window of logits and of presence around it (2 x W x W)."""
    from numpy.lib.stride_tricks import sliding_window_view

    logits, size = fold.views[0], 2 * radius + 1
    out = np.zeros((len(logits), 2, size, size), np.float32)
    for patient in np.unique(fold.patients):
        rows, grid_rows, grid_columns = slide_cells(fold, patient)
        values = np.zeros((grid_rows.max() + 1 + 2 * radius, grid_columns.max() + 1 + 2 * radius), np.float32)
        present = np.zeros_like(values)
        values[grid_rows + radius, grid_columns + radius] = logits[rows]
        present[grid_rows + radius, grid_columns + radius] = 1
        out[rows, 0] = sliding_window_view(values, (size, size))[grid_rows, grid_columns]
        out[rows, 1] = sliding_window_view(present, (size, size))[grid_rows, grid_columns]
    return out


def calibrated(train: list[Fold], apply: Fold) -> tuple[list[np.ndarray], np.ndarray]:
    """The one-view logits of the training folds and of the applied one, put on even odds by
    a Platt calibration fitted on the training folds (as a shipped model's is on val patients)."""
    from histoscreen.scoring.calibration import fit_calibration

    temperature, bias = fit_calibration(np.concatenate([f.labels for f in train]), np.concatenate([f.views[0] for f in train]))
    return [f.views[0] / temperature + bias for f in train], apply.views[0] / temperature + bias


def positions_of(fold: Fold):
    from histoscreen.data import SlidePositions

    return SlidePositions.of(fold.patients, fold.xs, fold.ys)


def fit_learned(train: list[Fold], apply: Fold) -> np.ndarray:
    """The shipped learned context (scoring.context.context_features, fitted by
    scoring.calibration.fit_logistic), on calibrated logits."""
    from histoscreen.scoring.calibration import fit_logistic
    from histoscreen.scoring.context import context_features, learned_context

    train_logits, apply_logits = calibrated(train, apply)
    features = np.vstack([context_features(z, positions_of(f)) for z, f in zip(train_logits, train)])
    linear = fit_logistic(features, np.concatenate([f.labels for f in train]))
    return learned_context(apply_logits, positions_of(apply), linear)


def fit_cnn(train: list[Fold], apply: Fold, seed: int = 0) -> np.ndarray:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    radius = WINDOW_RADIUS

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.out = nn.Sequential(nn.Linear(17, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, window):
            return self.out(torch.cat([self.conv(window), window[:, :1, radius, radius]], 1)).squeeze(1)

    inputs = torch.tensor(np.concatenate([windows(f, radius) for f in train]))
    labels = torch.tensor(np.concatenate([f.labels for f in train]).astype(np.float32))
    head = Head()
    optimiser = torch.optim.AdamW(head.parameters(), 3e-3, weight_decay=1e-3)
    for _ in range(6):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 256):
            batch = order[start : start + 256]
            window = inputs[batch]
            if torch.rand(1) < 0.5:
                window = window.flip(3)
            window = torch.rot90(window, int(torch.randint(4, (1,))), (2, 3))
            loss = nn.functional.binary_cross_entropy_with_logits(head(window), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return head(torch.tensor(windows(apply, radius))).numpy().astype(np.float64)


def fit_blend(train: list[Fold], apply: Fold) -> np.ndarray:
    from histoscreen.data import SlidePositions
    from histoscreen.scoring.context import CONTEXT_RADII, CONTEXT_WEIGHTS, blend_with_neighbours
    from histoscreen.scoring.metrics import roc_auc

    def blended(fold, radius, weight):
        return blend_with_neighbours(fold.views[0], SlidePositions.of(fold.patients, fold.xs, fold.ys), radius, weight)

    settings = [(r, w) for r in CONTEXT_RADII for w in CONTEXT_WEIGHTS]
    best = max(settings, key=lambda s: np.mean([roc_auc(f.labels, blended(f, *s)) for f in train]))
    return blended(apply, *best)


def main() -> None:
    from cv import fold_figures
    from histoscreen.scoring.calibration import ThresholdRule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", nargs="?", default="shipped")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "cv")
    parser.add_argument("--contexts", default="blend,learned,CNN", help="comma-separated (default: all; CNN adds CNN+blend)")
    args = parser.parse_args()
    contexts = args.contexts.split(",")
    folds = fold_logits(args.candidate, full_store(args.work), args.work, args.folds)
    fits = {"blend": fit_blend, "learned": fit_learned, "CNN": fit_cnn}
    wanted = set(contexts) | ({"blend"} if "CNN" in contexts else set())  # CNN+blend needs the blend
    scores: dict[str, list[np.ndarray]] = {name: [] for name in fits if name in wanted}
    for index, fold in enumerate(folds):
        others = [f for i, f in enumerate(folds) if i != index]
        for name in scores:
            scores[name].append(fits[name](others, fold))
    if "CNN" in contexts:
        scores["CNN+blend"] = [cnn + blend for cnn, blend in zip(scores["CNN"], scores["blend"])]
    print(f"learned slide context, {args.folds}-fold patient-grouped CV, candidate {args.candidate}: mean (worst fold)")
    print(f"{'context':10} {'rule':10}" + "".join(f"{n:>16}" for n in ("accuracy", "sensitivity", "specificity", "bal. accuracy", "ROC-AUC")))
    for name, per_fold in scores.items():
        for rule_name in RULES:
            figures = [fold_figures(fold, {(): s}, ThresholdRule(**RULES[rule_name]))[0] for fold, s in zip(folds, per_fold)]
            print(f"{name:10} {rule_name:10}" + "".join(f"  {np.mean([f[k] for f in figures]):.4f} ({np.min([f[k] for f in figures]):.3f})"
                                                       for k in figures[0]), flush=True)


if __name__ == "__main__":
    main()
