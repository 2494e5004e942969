"""Metrics: confusion counts, ROC, precision-recall, calibration error, patient bootstrap.

Metric functions are pure: arrays in (labels 0/1, IDC probabilities or scores), numbers
out. An undefined value (sensitivity without positives, AUC with one class) is NaN. The
public ones check their arrays first (as scikit-learn's check_consistent_length does), so a
mistake is a message naming the argument, not a numpy broadcast error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.errors import ArgumentError

if TYPE_CHECKING:  # pandas is imported where a table is built: screening a slide needs none
    import pandas as pd


def check_labels_and_scores(labels, scores, *, scores_name: str = "probabilities") -> tuple[np.ndarray, np.ndarray]:
    """(labels as int 0/1, scores as float64), both 1-D and of one length, or an ArgumentError.

    >>> check_labels_and_scores([0, 1, 1], [0.2, 0.9])
    Traceback (most recent call last):
    ...
    histoscreen.errors.ArgumentError: labels has 3 values but probabilities has 2
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    for name, values in (("labels", labels), (scores_name, scores)):
        if values.ndim != 1:
            raise ArgumentError(f"{name} must be one-dimensional, got shape {values.shape}")
    if len(labels) != len(scores):
        raise ArgumentError(f"labels has {len(labels)} values but {scores_name} has {len(scores)}")
    if labels.dtype == bool:
        labels = labels.astype(int)
    if labels.size and (labels.dtype.kind not in "iuf" or not np.isin(labels, (0, 1)).all()):
        raise ArgumentError(f"labels must be 0 (non-IDC) or 1 (IDC), got values {np.unique(labels)[:5].tolist()}")
    if scores.dtype.kind not in "iuf":
        raise ArgumentError(f"{scores_name} must be numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ArgumentError(f"{scores_name} holds {int((~np.isfinite(scores)).sum())} values that are not finite numbers")
    return labels.astype(int), scores


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp).

    >>> confusion_counts(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    (1, 1, 0, 2)
    """
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp = int(np.sum(labels & predicted))
    fp = int(np.sum(~labels & predicted))
    fn = int(np.sum(labels & ~predicted))
    return int(labels.size - tp - fp - fn), fp, fn, tp


def _ratio(numerator: float, denominator: float, undefined: float = math.nan) -> float:
    return numerator / denominator if denominator else undefined


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, ties counted half (Mann-Whitney U); NaN with one class.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from (0, 0)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tp = np.cumsum(sorted_labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, sorted_scores[last_of_tie]]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum (scikit-learn's definition)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    if not labels.any():
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tp = np.cumsum(sorted_labels)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Mean |predicted IDC probability - observed IDC rate| over equal-width bins, weighted by size."""
    labels, probabilities = np.asarray(labels, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(probabilities[inside].mean() - labels[inside].mean())
    return float(total / max(len(labels), 1))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy, sensitivity, specificity, precision, F1, ROC-AUC, PR-AUC,
    Brier score, ECE and the confusion counts, at `threshold`.

    >>> classification_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9], 0.5)["accuracy"]
    0.75
    """
    labels, probabilities = check_labels_and_scores(labels, probabilities)
    tn, fp, fn, tp = confusion_counts(labels, probabilities >= threshold)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    recalls = [r for r in (sensitivity, specificity) if not math.isnan(r)]
    precision = _ratio(tp, tp + fp, undefined=0.0)
    return {
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, undefined=0.0),
        "roc_auc": roc_auc(labels, probabilities),
        "pr_auc": average_precision(labels, probabilities),
        "brier": float(np.mean((probabilities - labels) ** 2)) if len(labels) else math.nan,
        "ece": expected_calibration_error(labels, probabilities),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "patches": int(len(labels)),
        "threshold": float(threshold),
    }


def sigmoid(values: np.ndarray) -> np.ndarray:
    # the tanh form never overflows, whatever the logit
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def bootstrap_by_patient(
    labels: np.ndarray,
    probabilities: np.ndarray,
    patients: np.ndarray,
    threshold: float,
    *,
    rounds: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Percentile confidence intervals from resampling whole patients with replacement.

    Patches of one patient are correlated, so resampling patches would give intervals that
    are far too narrow; the patient is the unit of independent evidence.
    """
    labels, probabilities = check_labels_and_scores(labels, probabilities)
    if len(patients) != len(labels):
        raise ArgumentError(f"labels has {len(labels)} values but patients has {len(patients)}")
    if rounds < 1:
        raise ArgumentError(f"rounds must be at least 1, got {rounds}")
    groups = [np.flatnonzero(np.asarray(patients) == p) for p in dict.fromkeys(np.asarray(patients).tolist())]
    rng = np.random.default_rng(seed)
    names = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        rows = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        result = classification_metrics(labels[rows], probabilities[rows], threshold)
        for name in names:
            samples[name].append(result[name])
    tail = (1 - level) / 2 * 100
    return {
        name: Interval(float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail)))
        for name, v in samples.items()
    }


def per_patient_table(labels: np.ndarray, probabilities: np.ndarray, patients: np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per patient: patch counts, true and predicted IDC fraction, recalls, accuracy."""
    import pandas as pd

    frame = pd.DataFrame({"patient": patients, "label": labels, "prob": probabilities})
    frame["pred"] = (frame["prob"] >= threshold).astype(int)
    rows = []
    for patient, group in frame.groupby("patient", sort=False):
        tn, fp, fn, tp = confusion_counts(group["label"].to_numpy(), group["pred"].to_numpy())
        rows.append(
            {
                "patient": patient,
                "patches": len(group),
                "idc_patches": int(group["label"].sum()),
                "true_idc_fraction": group["label"].mean(),
                "predicted_idc_fraction": group["pred"].mean(),
                "accuracy": (tp + tn) / len(group),
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "roc_auc": roc_auc(group["label"].to_numpy(), group["prob"].to_numpy()),
            }
        )
    return pd.DataFrame(rows)


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per equal-width bin of predicted IDC probability: count, mean prediction, observed IDC rate."""
    import pandas as pd

    which = np.minimum((np.asarray(probabilities) * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": which, "prob": probabilities, "label": labels})
    table = frame.groupby("bin").agg(patches=("label", "size"), mean_prob=("prob", "mean"), idc_rate=("label", "mean"))
    return table.reset_index()


