#!/usr/bin/env python3
"""Learned slide context, through the same patient-grouped CV as benchmarks/cv.py: can a
model of the neighbourhood's scores beat today's fixed blend with the neighbours' mean?

usage: python benchmarks/cv_learned_context.py [CANDIDATE] [--work .cache/cv]

Reads the out-of-fold logits cv.py cached for CANDIDATE (run cv.py CANDIDATE first). For
each fold, a context model is fitted on the OTHER folds' held-out patients (their logits
came from models that never trained on them, as a new patient's would) and applied to this
fold's patients; the threshold is then chosen per held-out patient on the other patients
of its fold, exactly as in cv.py. Context models:

- blend: today's shipped scoring (radius and weight chosen on the other folds);
- LR: logistic regression on the patch's logit, the neighbours' mean logit and how many
  there are at radii 1, 2, 3, 5, 8, the 3x3 max and min, the 5x5 spread, and the slide's
  median, 10th and 90th percentile and share above 0 (per-slide normalisation);
- CNN: a 3-layer CNN (16 channels) on the 11 x 11 window of logits and presence mask,
  trained 6 epochs with dihedral flips; CNN+blend: the sum of its logit and the blend's.
Only the plain (one view) logits are used: the default path's. Prints mean (worst fold).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv import REPO, RULES, Fold, fold_logits, full_store  # noqa: E402

WINDOW_RADIUS = 5


def slide_cells(fold: Fold, patient: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.flatnonzero(fold.patients == patient)
    return rows, fold.ys[rows] // 50, fold.xs[rows] // 50


def windows(fold: Fold, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the (2r+1)^2 window of logits and of presence around it (2 x W x W), and
    its slide's median, 10th, 90th percentile logit and share above 0."""
    from numpy.lib.stride_tricks import sliding_window_view

    logits, size = fold.views[0], 2 * radius + 1
    out = np.zeros((len(logits), 2, size, size), np.float32)
    slide = np.zeros((len(logits), 4), np.float32)
    for patient in np.unique(fold.patients):
        rows, grid_rows, grid_columns = slide_cells(fold, patient)
        values = np.zeros((grid_rows.max() + 1 + 2 * radius, grid_columns.max() + 1 + 2 * radius), np.float32)
        present = np.zeros_like(values)
        values[grid_rows + radius, grid_columns + radius] = logits[rows]
        present[grid_rows + radius, grid_columns + radius] = 1
        out[rows, 0] = sliding_window_view(values, (size, size))[grid_rows, grid_columns]
        out[rows, 1] = sliding_window_view(present, (size, size))[grid_rows, grid_columns]
        own = logits[rows]
        slide[rows] = [np.median(own), np.quantile(own, 0.1), np.quantile(own, 0.9), np.mean(own > 0)]
    return out, slide


def features(fold: Fold) -> np.ndarray:
    from histoscreen.data import SlidePositions
    from histoscreen.scoring.context import neighbour_means

    logits = fold.views[0]
    positions = SlidePositions.of(fold.patients, fold.xs, fold.ys)
    columns = [logits]
    for radius in (1, 2, 3, 5, 8):
        means, counts = neighbour_means(logits, positions, radius)
        columns += [np.where(counts > 0, means, logits), counts / ((2 * radius + 1) ** 2 - 1)]
    window, slide = windows(fold, 2)
    inner = np.where(window[:, 1, 1:4, 1:4] > 0, window[:, 0, 1:4, 1:4], np.nan).reshape(len(logits), -1)
    inner[:, 4] = np.nan  # the patch itself
    both = np.where(window[:, 1] > 0, window[:, 0], np.nan).reshape(len(logits), -1)
    has_neighbour = window[:, 1, 1:4, 1:4].sum((1, 2)) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a patch alone on its slide has no neighbours
        columns += [np.nan_to_num(np.nanmax(inner, 1), nan=0) * has_neighbour,
                    np.nan_to_num(np.nanmin(inner, 1), nan=0) * has_neighbour,
                    np.nan_to_num(np.nanstd(both, 1), nan=0)]
    return np.column_stack([*columns, slide])


def fit_logistic(train: list[Fold], apply: Fold) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(np.vstack([features(f) for f in train]), np.concatenate([f.labels for f in train]))
    return model.decision_function(features(apply))


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

    inputs = torch.tensor(np.concatenate([windows(f, radius)[0] for f in train]))
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
        return head(torch.tensor(windows(apply, radius)[0])).numpy().astype(np.float64)


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
    args = parser.parse_args()
    folds = fold_logits(args.candidate, full_store(args.work), args.work, args.folds)
    scores: dict[str, list[np.ndarray]] = {"blend": [], "LR": [], "CNN": [], "CNN+blend": []}
    for index, fold in enumerate(folds):
        others = [f for i, f in enumerate(folds) if i != index]
        scores["blend"].append(fit_blend(others, fold))
        scores["LR"].append(fit_logistic(others, fold))
        scores["CNN"].append(fit_cnn(others, fold))
        scores["CNN+blend"].append(scores["CNN"][-1] + scores["blend"][-1])
    print(f"learned slide context, {args.folds}-fold patient-grouped CV, candidate {args.candidate}: mean (worst fold)")
    print(f"{'context':10} {'rule':10}" + "".join(f"{n:>16}" for n in ("accuracy", "sensitivity", "specificity", "bal. accuracy", "ROC-AUC")))
    for name, per_fold in scores.items():
        for rule_name in ("BA", "acc>=0.87"):
            figures = [fold_figures(fold, {(): s}, ThresholdRule(**RULES[rule_name]))[0] for fold, s in zip(folds, per_fold)]
            print(f"{name:10} {rule_name:10}" + "".join(f"  {np.mean([f[k] for f in figures]):.4f} ({np.min([f[k] for f in figures]):.3f})"
                                                       for k in figures[0]), flush=True)


if __name__ == "__main__":
    main()
