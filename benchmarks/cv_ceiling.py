#!/usr/bin/env python3
"""What no scoring can reach: the accuracy ceiling of the CV's fold networks, and where their errors lie.

usage: python benchmarks/cv_ceiling.py [--split-seeds 0 1] [--recipe with-extra] [--also official-train]

Reads the fold networks and logits `benchmarks/cv.py` cached (run it first; this trains
nothing). For every fold, on the official-list held-out patients, scored as the product
scores them (the scoring `histoscreen train` stored: the blend context, the threshold of
highest balanced accuracy):

- accuracy at the shipped threshold, and the best accuracy ANY threshold reaches on those
  same held-out patients (an oracle that looks at their labels: a ceiling for every
  threshold rule, never a figure to promise), with the ROC-AUC;
- the same ceiling for the mean of two networks that never saw the fold (--also: another
  recipe's fold network, trained on other patients), which asks whether averaging away a
  network's variance lifts it;
- how much the 32 extra patients can tell: their calls pooled over the folds, balanced
  accuracy with a 95% interval from resampling whole patients;
- where the errors lie: false positives against false negatives, the share of false
  positives on the 5 and 10 patients with most of them, the accuracy without the 5, and
  the share of false positives within 2 grid steps (100 px) of a patch annotated IDC, against
  the share of all non-IDC patches there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import cv
from histoscreen.scoring.metrics import bootstrap_by_patient, classification_metrics, sigmoid
from measure import cpu_model

SHIPPED = cv.Procedure("model", "blend", "BA")


def best_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest accuracy of `scores >= t` over every threshold t, exactly."""
    order = np.argsort(-scores, kind="stable")
    ranked_labels, ranked = labels[order].astype(np.int64), scores[order]
    # calling the top k positive: true positives among them plus true negatives below them
    correct = np.concatenate([[0], np.cumsum(2 * ranked_labels - 1)]) + (len(labels) - ranked_labels.sum())
    cuts = np.concatenate([[True], ranked[1:] != ranked[:-1], [True]])  # tied scores go together
    return float(correct[cuts].max() / len(labels))


def margin_logits(part: cv.Part, model: Path) -> np.ndarray:
    """The product's final logit less its threshold's: > 0 is an IDC call."""
    probabilities, threshold = cv.Scorer(SHIPPED, None, model)(part)
    probabilities = np.clip(probabilities, 1e-9, 1 - 1e-9)
    return np.log(probabilities / (1 - probabilities)) - np.log(threshold / (1 - threshold))


def grid_steps_to_idc(table: pd.DataFrame) -> np.ndarray:
    """Per patch, the Chebyshev distance in grid steps to the nearest patch of its slide
    annotated IDC (a large number on slides without any)."""
    from histoscreen.data.naming import grid_index

    distance = np.full(len(table), 10**6)
    for _, slide in table.groupby("patient"):
        cells = np.column_stack([grid_index(slide.x.to_numpy()), grid_index(slide.y.to_numpy())])
        idc = cells[slide.label.to_numpy() == 1]
        if len(idc):
            distance[slide.index] = np.abs(cells[:, None, :] - idc[None, :, :]).max(axis=2).min(axis=1)
    return distance


def ceiling(work: Path, seed: int, recipe: str = "with-extra", also: str | None = "official-train", folds: int = 3) -> dict | None:
    """One fold assignment's ceiling and errors (see the module's docstring), from cv.py's
    cache under `work`; None when its fold logits are not cached. "also" is left out where
    that recipe's fold networks are not cached."""
    store = work / "store"
    patches = cv.Patches.of(store)
    fold_of = cv.fold_assignment(patches, folds, seed)
    work = work / f"seed-{seed}"
    models = [work / recipe / f"fold-{k}" for k in range(1, folds + 1)]
    if not all((m / "logits.npz").exists() for m in models):
        return None
    pair = [work / also / f"fold-{k}" for k in range(1, folds + 1)] if also else None
    pair = pair if pair and all((m / "logits.npz").exists() for m in pair) else None
    rows, tables, extra = [], [], []
    for k, model in enumerate(models, start=1):
        part = cv.Part.of(cv.fold_logits(recipe, store, work, fold_of, k).held_out)
        official = np.array([cv.population(p) == "official" for p in part.patients])
        every_margin = margin_logits(part, model)
        extra.append((part.labels[~official], every_margin[~official], part.patients[~official].astype(str)))
        margins, labels = every_margin[official], part.labels[official]
        figures = cv.patch_figures(labels, sigmoid(margins), 0.5)
        row = {"accuracy": figures["accuracy"], "ceiling": best_accuracy(labels, margins), "roc_auc": figures["roc_auc"]}
        if pair:
            other = cv.Part.of(cv.fold_logits(also, store, work, fold_of, k).held_out)
            assert np.array_equal(other.patients, part.patients) and np.array_equal(other.xs, part.xs)
            row["pair_ceiling"] = best_accuracy(labels, (margins + margin_logits(other, pair[k - 1])[official]) / 2)
        rows.append(row)
        tables.append(pd.DataFrame({"patient": part.patients[official], "x": part.xs[official], "y": part.ys[official],
                                    "label": labels, "call": (margins > 0).astype(int)}))
    table = pd.concat(tables, ignore_index=True)
    false_positive = (table.call == 1) & (table.label == 0)
    per_patient = false_positive.groupby(table.patient).sum().sort_values(ascending=False)
    worst = table.patient.isin(per_patient.index[:5])
    near = grid_steps_to_idc(table) <= 2
    errors = {"patients": int(table.patient.nunique()), "patches": len(table), "false_positives": int(false_positive.sum()),
              "false_negatives": int(((table.call == 0) & (table.label == 1)).sum()),
              "worst_5_share": float(per_patient.iloc[:5].sum() / false_positive.sum()),
              "worst_10_share": float(per_patient.iloc[:10].sum() / false_positive.sum()),
              "accuracy_without_worst_5": float((table.call[~worst] == table.label[~worst]).mean()),
              "near_idc_false_positives": float(near[false_positive.to_numpy()].mean()),
              "near_idc_negatives": float(near[table.label.to_numpy() == 0].mean())}
    labels, margins, patients = (np.concatenate(column) for column in zip(*extra))
    probabilities = sigmoid(margins)
    interval = bootstrap_by_patient(labels, probabilities, patients, 0.5, rounds=2000)["balanced_accuracy"]
    pooled = {"patients": len(set(patients)), "balanced_accuracy": classification_metrics(labels, probabilities, 0.5)["balanced_accuracy"],
              "low": interval.low, "high": interval.high}
    return {"folds": rows, "mean": {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}, "errors": errors,
            "with": also if pair else None, "extra_pooled": pooled}


def pooled_line(pooled: dict) -> str:
    return (f"the {pooled['patients']} extra patients pooled over the folds: balanced accuracy {pooled['balanced_accuracy']:.3f} "
            f"(95% interval resampling patients {pooled['low']:.3f}-{pooled['high']:.3f})")


def errors_line(errors: dict) -> str:
    return (f"{errors['false_positives']:,} false positives and {errors['false_negatives']:,} false negatives on {errors['patients']} "
            f"patients ({errors['patches']:,} patches); the 5 / 10 patients with most false positives hold "
            f"{errors['worst_5_share']:.0%} / {errors['worst_10_share']:.0%} of them (accuracy without those 5: "
            f"{errors['accuracy_without_worst_5']:.3f}); {errors['near_idc_false_positives']:.0%} of the false positives lie within "
            f"2 grid steps of a patch annotated IDC, where {errors['near_idc_negatives']:.0%} of all non-IDC patches lie")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipe", default="with-extra")
    parser.add_argument("--also", default="official-train", help="a second recipe for the two-network mean, where cached")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=cv.REPO / ".cache" / "cv")
    args = parser.parse_args()
    if not (args.work / "store" / "store.json").exists():
        sys.exit(f"no CV store in {args.work / 'store'}: run benchmarks/cv.py first")
    print(f"held-out patients of the {args.recipe} fold networks, scored as shipped ({cpu_model()})")
    for seed in args.split_seeds:
        found = ceiling(args.work, seed, args.recipe, args.also, args.folds)
        if found is None:
            print(f"\nsplit seed {seed}: no cached {args.recipe} fold logits (run cv.py --split-seed {seed} {args.recipe})")
            continue
        columns = ["accuracy", "ceiling", "roc_auc"] + (["pair_ceiling"] if found["with"] else [])
        print(f"\nsplit seed {seed}" + "".join(f"{c:>14}" for c in columns)
              + (f"   (pair_ceiling: mean with the {found['with']} fold network)" if found["with"] else ""))
        for k, row in enumerate(found["folds"], start=1):
            print(f"  fold {k}    " + "".join(f"{row[c]:14.3f}" for c in columns))
        print("  mean      " + "".join(f"{found['mean'][c]:14.3f}" for c in columns))
        print("  " + errors_line(found["errors"]))
        print("  " + pooled_line(found["extra_pooled"]))


if __name__ == "__main__":
    main()
