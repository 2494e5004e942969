"""Pictures of an evaluation: ROC, precision-recall, confusion, calibration, training curves.

Drawn on matplotlib Figure objects directly, never through pyplot: no backend is chosen,
no global state is touched, and it works in any thread of a web server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from histoscreen.scoring.metrics import classification_metrics, reliability_bins, roc_curve


def _figure(size: tuple[float, float]):
    figure = Figure(figsize=size)
    return figure, figure.subplots()


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
    out_dir = Path(out_dir)
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)
    metrics = classification_metrics(labels, probabilities, threshold)
    written = []

    def save(figure: Figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        written.append(name)

    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    figure, axes = _figure((4.8, 4.5))
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
    figure, axes = _figure((4.8, 4.5))
    axes.plot(recall, precision, color="#1f77b4", label=f"AP {metrics['pr_auc']:.3f}")
    axes.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1, label="prevalence")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall: {title}")
    axes.legend(loc="lower left")
    save(figure, "pr.png")

    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    figure, axes = _figure((4.2, 3.8))
    axes.imshow(matrix / matrix.sum(axis=1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        share = count / max(matrix[row].sum(), 1)
        axes.text(column, row, f"{count:,}\n{share:.1%}", ha="center", va="center", color="white" if share > 0.5 else "black")
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-IDC", "IDC"], yticklabels=["non-IDC", "IDC"])
    axes.set(xlabel="predicted", ylabel="true", title=f"Confusion at {threshold:.3f}")
    save(figure, "confusion.png")

    table = reliability_bins(labels, probabilities)
    figure, axes = _figure((4.8, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.plot(table["mean_prob"], table["idc_rate"], marker="o", color="#1f77b4", label=f"ECE {metrics['ece']:.3f}")
    axes.set(xlabel="predicted IDC probability", ylabel="observed IDC rate", xlim=(0, 1), ylim=(0, 1), title=f"Calibration: {title}")
    axes.legend(loc="upper left")
    save(figure, "calibration.png")

    if history:
        epochs = [h["epoch"] for h in history]
        figure = Figure(figsize=(9, 3.8))
        loss_axes, score_axes = figure.subplots(1, 2)
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
