"""Metrics, threshold choice, temperature calibration, patient bootstrap and plots.

Metric functions are pure: arrays in (labels 0/1, IDC probabilities or scores), numbers
out. An undefined value (sensitivity without positives, AUC with one class) is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


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
    Brier score, ECE and the confusion counts, at `threshold`."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
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


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, min_sensitivity: float | None = None) -> float:
    """The threshold with the best balanced accuracy, or, with `min_sensitivity`, the
    highest-specificity threshold whose sensitivity is at least that.

    The threshold returned sits halfway between two neighbouring distinct scores, so it
    does not hinge on one patch's exact value.
    """
    labels, probabilities = np.asarray(labels).astype(bool), np.asarray(probabilities, dtype=np.float64)
    if labels.all() or not labels.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if min_sensitivity is None:
        best = int(np.argmax(tpr + (1 - fpr)))
    else:
        allowed = np.flatnonzero(tpr >= min_sensitivity)
        best = int(allowed[np.argmin(fpr[allowed])])
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float((thresholds[best] + lower) / 2)


def fit_calibration(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Temperature T and bias b minimising the log-loss of sigmoid(logit / T + b).

    Temperature scaling (Guo et al. 2017) with a bias term, i.e. Platt scaling: a
    class-weighted loss shifts every logit by log(pos_weight), which a temperature alone
    cannot undo. Fitted by Newton's method on the two parameters.
    """
    labels, logits = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    if labels.all() or not labels.any():
        return 1.0, 0.0
    features = np.stack([logits, np.ones_like(logits)], axis=1)

    def log_loss(weights: np.ndarray) -> float:
        scaled = features @ weights
        return float(np.mean(np.logaddexp(0, scaled) - labels * scaled))

    weights = np.array([1.0, 0.0])
    loss = log_loss(weights)
    for _ in range(100):
        probabilities = sigmoid(features @ weights)
        gradient = features.T @ (probabilities - labels) / len(labels)
        curvature = features.T @ (features * (probabilities * (1 - probabilities))[:, None]) / len(labels)
        step = np.linalg.solve(curvature + 1e-9 * np.eye(2), gradient)
        # Newton steps overshoot from far away; halve until the loss goes down.
        scale = 1.0
        while scale > 1e-6 and log_loss(weights - scale * step) > loss:
            scale /= 2
        weights = weights - scale * step
        new_loss = log_loss(weights)
        if loss - new_loss < 1e-12:
            break
        loss = new_loss
    slope = max(float(weights[0]), 1e-3)  # a model that ranks patches the wrong way round is not rescued here
    return 1.0 / slope, float(weights[1])


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
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    groups = [np.flatnonzero(np.asarray(patients) == p) for p in pd.unique(np.asarray(patients))]
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
    which = np.minimum((np.asarray(probabilities) * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": which, "prob": probabilities, "label": labels})
    table = frame.groupby("bin").agg(patches=("label", "size"), mean_prob=("prob", "mean"), idc_rate=("label", "mean"))
    return table.reset_index()


def write_plots(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    out_dir,
    *,
    title: str,
    history: list[dict] | None = None,
) -> list[str]:
    """ROC, precision-recall, confusion matrix, calibration and (given a history) training
    curves as PNG files in `out_dir`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pathlib import Path

    out_dir = Path(out_dir)
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)
    metrics = classification_metrics(labels, probabilities, threshold)
    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        written.append(name)

    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    figure, axes = plt.subplots(figsize=(4.8, 4.5))
    axes.plot(fpr, tpr, color="#1f77b4", label=f"AUC {metrics['roc_auc']:.3f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.scatter([1 - metrics["specificity"]], [metrics["sensitivity"]], color="#d62728", zorder=3, label=f"threshold {threshold:.3f}")
    axes.set(xlabel="1 - specificity (non-IDC called IDC)", ylabel="sensitivity (IDC recall)", title=f"ROC: {title}")
    axes.legend(loc="lower right")
    save(figure, "roc.png")

    order = np.argsort(-probabilities, kind="mergesort")
    hits = np.cumsum(labels[order])
    precision = hits / np.arange(1, len(labels) + 1)
    recall = hits / max(labels.sum(), 1)
    figure, axes = plt.subplots(figsize=(4.8, 4.5))
    axes.plot(recall, precision, color="#1f77b4", label=f"AP {metrics['pr_auc']:.3f}")
    axes.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1, label="prevalence")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall: {title}")
    axes.legend(loc="lower left")
    save(figure, "pr.png")

    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    figure, axes = plt.subplots(figsize=(4.2, 3.8))
    axes.imshow(matrix / matrix.sum(axis=1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        share = count / max(matrix[row].sum(), 1)
        axes.text(column, row, f"{count:,}\n{share:.1%}", ha="center", va="center", color="white" if share > 0.5 else "black")
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-IDC", "IDC"], yticklabels=["non-IDC", "IDC"])
    axes.set(xlabel="predicted", ylabel="true", title=f"Confusion at {threshold:.3f}")
    save(figure, "confusion.png")

    table = reliability_bins(labels, probabilities)
    figure, axes = plt.subplots(figsize=(4.8, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.plot(table["mean_prob"], table["idc_rate"], marker="o", color="#1f77b4", label=f"ECE {metrics['ece']:.3f}")
    axes.set(xlabel="predicted IDC probability", ylabel="observed IDC rate", xlim=(0, 1), ylim=(0, 1), title=f"Calibration: {title}")
    axes.legend(loc="upper left")
    save(figure, "calibration.png")

    if history:
        epochs = [h["epoch"] for h in history]
        figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(9, 3.8))
        loss_axes.plot(epochs, [h["train_loss"] for h in history], label="train loss (weighted)")
        loss_axes.plot(epochs, [h["val_loss"] for h in history], label="val loss")
        loss_axes.set(xlabel="epoch", title="Loss")
        loss_axes.legend()
        for key, label in (("val_best_balanced_accuracy", "val balanced accuracy"), ("val_auc", "val ROC-AUC")):
            score_axes.plot(epochs, [h[key] for h in history], label=label)
        score_axes.set(xlabel="epoch", title="Validation (val patients)")
        score_axes.legend()
        save(figure, "training_curves.png")
    return written
