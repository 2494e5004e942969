"""Fitting the scoring on val patients: temperature and bias, the threshold, slide context.

Only ever run on val patients: a threshold tuned on test would flatter every figure. The
fit takes logits, not a model, so it serves training, `calibrate` and the cross-validation
benchmarks alike.
"""

from __future__ import annotations

import numpy as np

from histoscreen.data.grid import SlidePositions
from histoscreen.models.bundle import Calibration, ContextSettings, Scoring, Validation, scoring_mode
from histoscreen.scoring.context import CONTEXT_RADII, CONTEXT_WEIGHTS, blend_with_neighbours
from histoscreen.scoring.metrics import classification_metrics, confusion_counts, roc_curve, sigmoid


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




def fit_scoring(
    labels: np.ndarray,
    plain_logits: np.ndarray,
    tta_logits: np.ndarray,
    *,
    positions: SlidePositions | None = None,
    patients: np.ndarray | None = None,
    min_sensitivity: float | None = None,
) -> tuple[Scoring, Validation]:
    """Fit temperature and bias, then the threshold on calibrated probabilities, for one view
    and for the mean of the 8 dihedral views (TTA); with `positions`, also the slide context
    (radius and weight by balanced accuracy, then its own calibration and threshold).

    `patients` (one per patch) adds leave-one-patient-out estimates of how the choices made
    here carry over to a patient they were not made on.
    """
    calibrations: dict[str, Calibration] = {}
    metrics: dict[str, dict] = {}
    leave_one_out: dict[str, dict] = {}
    context: ContextSettings | None = None
    for tta, logits in ((False, plain_logits), (True, tta_logits)):
        mode = scoring_mode(tta=tta, context=False)
        temperature, bias = fit_calibration(labels, logits)
        calibrated = logits / temperature + bias
        threshold = choose_threshold(labels, sigmoid(calibrated), min_sensitivity)
        calibrations[mode] = Calibration(temperature, bias, threshold)
        metrics[mode] = classification_metrics(labels, sigmoid(calibrated), threshold)
        if positions is None:
            continue
        candidates = {
            (radius, weight): blend_with_neighbours(calibrated, positions, radius, weight)
            for radius in CONTEXT_RADII
            for weight in CONTEXT_WEIGHTS
        }
        if context is None:
            radius, weight = max(candidates, key=lambda key: best_balanced_accuracy(labels, candidates[key], min_sensitivity))
            context = ContextSettings(radius, weight)
        mixed = candidates[(context.radius, context.weight)]
        context_temperature, context_bias = fit_calibration(labels, mixed)
        probabilities = sigmoid(mixed / context_temperature + context_bias)
        context_mode = scoring_mode(tta=tta, context=True)
        calibrations[context_mode] = Calibration(
            context_temperature, context_bias, choose_threshold(labels, probabilities, min_sensitivity)
        )
        metrics[context_mode] = classification_metrics(labels, probabilities, calibrations[context_mode].threshold)
        if patients is not None:
            leave_one_out[mode] = {
                "patch": leave_one_patient_out(labels, patients, {"patch": calibrated}, min_sensitivity),
                "context": leave_one_patient_out(labels, patients, candidates, min_sensitivity),
            }
    scoring = Scoring(context=context, **calibrations)
    rule = "max balanced accuracy" if min_sensitivity is None else f"max specificity with sensitivity >= {min_sensitivity}"
    return scoring, Validation(threshold_rule=rule, metrics=metrics, leave_one_patient_out=leave_one_out)


def best_balanced_accuracy(labels: np.ndarray, scores: np.ndarray, min_sensitivity: float | None = None) -> float:
    """Balanced accuracy at the threshold `choose_threshold` picks for these scores."""
    return classification_metrics(labels, scores, choose_threshold(labels, scores, min_sensitivity))["balanced_accuracy"]


def leave_one_patient_out(
    labels: np.ndarray, patients: np.ndarray, candidates: dict, min_sensitivity: float | None = None
) -> dict:
    """How choices made on val patients carry over to a new patient: for each patient, pick
    the candidate scoring and its threshold on all the others, then call that patient's
    patches with them. Returns the pooled accuracy, balanced accuracy, sensitivity and
    specificity of those calls (a threshold is a monotone cut, so scores need no
    calibration here)."""
    calls = np.zeros(len(labels), dtype=bool)
    for patient in np.unique(patients):
        held = patients == patient
        rest = ~held
        best = max(candidates, key=lambda key: best_balanced_accuracy(labels[rest], candidates[key][rest], min_sensitivity))
        scores = candidates[best]
        calls[held] = scores[held] >= choose_threshold(labels[rest], scores[rest], min_sensitivity)
    tn, fp, fn, tp = confusion_counts(labels, calls)
    sensitivity, specificity = tp / max(1, tp + fn), tn / max(1, tn + fp)
    return {
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "patients": int(len(np.unique(patients))),
    }
