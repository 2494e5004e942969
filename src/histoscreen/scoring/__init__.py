"""Scoring stage: the scoring settings a model stores, metrics, calibration and threshold
fitting, and slide context (numpy only)."""

from histoscreen.scoring.calibration import choose_threshold, fit_calibration, fit_scoring, leave_one_patient_out
from histoscreen.scoring.context import CONTEXT_RADII, CONTEXT_WEIGHTS, blend_with_neighbours, neighbour_means
from histoscreen.scoring.settings import Calibration, ContextSettings, Scoring, Validation
from histoscreen.scoring.metrics import (
    bootstrap_by_patient,
    classification_metrics,
    confusion_counts,
    expected_calibration_error,
    per_patient_table,
    roc_auc,
    roc_curve,
    sigmoid,
)

__all__ = [
    "Calibration",
    "ContextSettings",
    "Scoring",
    "Validation",
    "CONTEXT_RADII",
    "CONTEXT_WEIGHTS",
    "blend_with_neighbours",
    "bootstrap_by_patient",
    "choose_threshold",
    "classification_metrics",
    "confusion_counts",
    "expected_calibration_error",
    "fit_calibration",
    "fit_scoring",
    "leave_one_patient_out",
    "neighbour_means",
    "per_patient_table",
    "roc_auc",
    "roc_curve",
    "sigmoid",
]
