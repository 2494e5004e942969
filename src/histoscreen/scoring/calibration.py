"""Fitting the scoring on val patients: temperature and bias, the threshold, slide context.

Only ever run on val patients: a threshold tuned on test would flatter every figure. The
fit takes logits, not a model, so it serves training, `calibrate` and the cross-validation
benchmarks alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from histoscreen.data.grid import SlidePositions
from histoscreen.checks import choice, number
from histoscreen.scoring.context import (
    CONTEXT_RADII, CONTEXT_WEIGHTS, blend_with_neighbours, context_features, learned_context, with_context,
)
from histoscreen.scoring.metrics import classification_metrics, confusion_counts, roc_curve, sigmoid
from histoscreen.scoring.settings import (
    MAX_ABS_BIAS, MAX_TEMPERATURE, MIN_TEMPERATURE, Calibration, ContextSettings, Scoring, Validation, scoring_mode,
)


THRESHOLD_OBJECTIVES = ("balanced_accuracy", "accuracy", "specificity")
CONTEXT_MODELS = ("blend", "learned")


@dataclass(frozen=True)
class ThresholdRule:
    """How the decision threshold is chosen on val patients: the threshold that maximises
    `objective` among those meeting the recall floors (when none does, the one with the best
    balanced accuracy). Accuracy weighs the classes by their prevalence in the val patients;
    balanced accuracy weighs them equally."""

    objective: str = "balanced_accuracy"
    min_sensitivity: float | None = None
    min_specificity: float | None = None

    def __post_init__(self) -> None:
        choice("threshold_objective", self.objective, THRESHOLD_OBJECTIVES)
        for name in ("min_sensitivity", "min_specificity"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), low=0, high=1, low_open=True)

    def describe(self) -> str:
        floors = [f"{name} >= {value}" for name, value in (("sensitivity", self.min_sensitivity), ("specificity", self.min_specificity)) if value is not None]
        return f"max {self.objective.replace('_', ' ')}" + (f" with {' and '.join(floors)}" if floors else "")


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, rule: ThresholdRule = ThresholdRule()) -> float:
    """The threshold `rule` picks on these scores (see ThresholdRule).

    The threshold returned sits halfway between two neighbouring distinct scores, so it
    does not hinge on one patch's exact value.

    >>> choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9])
    0.5
    """
    labels, probabilities = np.asarray(labels).astype(bool), np.asarray(probabilities, dtype=np.float64)
    if labels.all() or not labels.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    positives, negatives = labels.sum(), (~labels).sum()
    objective = {
        "balanced_accuracy": tpr + (1 - fpr),
        "accuracy": tpr * positives + (1 - fpr) * negatives,
        "specificity": 1 - fpr + 1e-12 * tpr,  # ties go to the more sensitive threshold
    }[rule.objective]
    allowed = np.ones(len(tpr), dtype=bool)
    if rule.min_sensitivity is not None:
        allowed &= tpr >= rule.min_sensitivity - 1e-12
    if rule.min_specificity is not None:
        allowed &= 1 - fpr >= rule.min_specificity - 1e-12
    if allowed.any():
        best = int(np.flatnonzero(allowed)[np.argmax(objective[allowed])])
    else:
        best = int(np.argmax(tpr + (1 - fpr)))
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float((thresholds[best] + lower) / 2)


def probability_threshold(labels: np.ndarray, probabilities: np.ndarray, rule: ThresholdRule) -> float:
    """`choose_threshold` for probabilities, kept strictly inside (0, 1): probabilities that
    saturate at exactly 0 or 1 (a context that separates its val patients completely) would
    otherwise put it on the boundary."""
    return float(np.clip(choose_threshold(labels, probabilities, rule), 1e-12, 1 - 1e-12))


def scored(scoring: Scoring, patch_logits: np.ndarray, positions: SlidePositions, *, tta: bool, context: bool) -> tuple[np.ndarray, float]:
    """IDC probabilities from calibrated patch logits, and the threshold that goes with them:
    as they are, or with the slide context among `positions` (every patch of the slides at
    hand) and its own calibration. How the Predictor, the cross-validation and the slide
    safety tests all score."""
    if not context:
        return sigmoid(patch_logits), scoring.calibration(scoring_mode(tta=tta, context=False)).threshold
    calibration = scoring.calibration(scoring_mode(tta=tta, context=True))
    return sigmoid(calibration.calibrated(with_context(scoring.context, patch_logits, positions))), calibration.threshold


def fit_calibration(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Temperature T and bias b minimising the log-loss of sigmoid(logit / T + b).

    Temperature scaling (Guo et al. 2017) with a bias term, i.e. Platt scaling: a
    class-weighted loss shifts every logit by log(pos_weight), which a temperature alone
    cannot undo.
    """
    labels, logits = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    if labels.all() or not labels.any():
        return 1.0, 0.0
    weights = _newton_logistic(np.stack([logits, np.ones_like(logits)], axis=1), labels, np.zeros(2), start=np.array([1.0, 0.0]))
    # a model that ranks patches the wrong way round is not rescued here; and a fit on
    # degenerate data stays within what a model file may hold
    slope = min(max(float(weights[0]), 1 / MAX_TEMPERATURE), 1 / MIN_TEMPERATURE)
    return 1.0 / slope, float(np.clip(weights[1], -MAX_ABS_BIAS, MAX_ABS_BIAS))


def fit_logistic(features: np.ndarray, labels: np.ndarray) -> tuple[float, ...]:
    """A logistic regression's weights on the columns of `features`, intercept last.

    Columns are standardised for the fit (the weights returned apply to the raw columns), and
    the standardised weights carry an L2 penalty of 1/(2N) |w|^2 per patch: scikit-learn's
    default (C = 1), which keeps perfectly separable data finite and is otherwise negligible.
    """
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    centre, spread = features.mean(0), features.std(0)
    spread[spread == 0] = 1.0
    design = np.column_stack([(features - centre) / spread, np.ones(len(features))])
    penalty = np.full(design.shape[1], 1.0 / len(labels))
    penalty[-1] = 0.0
    weights = _newton_logistic(design, labels, penalty, start=np.zeros(design.shape[1]))
    raw = weights[:-1] / spread
    return (*map(float, raw), float(weights[-1] - raw @ centre))


def _newton_logistic(design: np.ndarray, labels: np.ndarray, penalty: np.ndarray, *, start: np.ndarray) -> np.ndarray:
    """Weights minimising the mean log-loss of sigmoid(design @ w) plus penalty/2 . w^2, by
    Newton's method."""

    def loss_of(weights: np.ndarray) -> float:
        scaled = design @ weights
        return float(np.mean(np.logaddexp(0, scaled) - labels * scaled) + 0.5 * penalty @ weights**2)

    weights = start.astype(np.float64)
    loss = loss_of(weights)
    for _ in range(100):
        probabilities = sigmoid(design @ weights)
        gradient = design.T @ (probabilities - labels) / len(labels) + penalty * weights
        curvature = design.T @ (design * (probabilities * (1 - probabilities))[:, None]) / len(labels) + np.diag(penalty)
        step = np.linalg.solve(curvature + 1e-9 * np.eye(len(weights)), gradient)
        # Newton steps overshoot from far away; halve until the loss goes down.
        scale = 1.0
        while scale > 1e-6 and loss_of(weights - scale * step) > loss:
            scale /= 2
        weights = weights - scale * step
        new_loss = loss_of(weights)
        if loss - new_loss < 1e-12:
            break
        loss = new_loss
    return weights


def fit_scoring(
    labels: np.ndarray,
    plain_logits: np.ndarray,
    tta_logits: np.ndarray,
    *,
    positions: SlidePositions | None = None,
    patients: np.ndarray | None = None,
    rule: ThresholdRule = ThresholdRule(),
    context_model: str = "blend",
) -> tuple[Scoring, Validation]:
    """Fit temperature and bias, then the threshold on calibrated probabilities, for one view
    and for the mean of the 8 dihedral views (TTA); with `positions`, also the slide context
    (the blend's radius and weight by balanced accuracy; with context_model "learned", the
    learned context's logistic regression too, which then decides), then its own calibration
    and threshold. The context is fitted on the one-view logits and serves both.

    `patients` (one per patch) adds leave-one-patient-out estimates of how the choices made
    here carry over to a patient they were not made on (the learned context refitted
    without each patient in turn).
    """
    choice("context_model", context_model, CONTEXT_MODELS)
    calibrations: dict[str, Calibration] = {}
    metrics: dict[str, dict] = {}
    leave_one_out: dict[str, dict] = {}
    context: ContextSettings | None = None
    for tta, logits in ((False, plain_logits), (True, tta_logits)):
        mode = scoring_mode(tta=tta, context=False)
        temperature, bias = fit_calibration(labels, logits)
        calibrated = logits / temperature + bias
        threshold = probability_threshold(labels, sigmoid(calibrated), rule)
        calibrations[mode] = Calibration(temperature, bias, threshold)
        metrics[mode] = classification_metrics(labels, sigmoid(calibrated), threshold)
        if positions is None:
            continue
        candidates = {
            (radius, weight): blend_with_neighbours(calibrated, positions, radius, weight)
            for radius in CONTEXT_RADII
            for weight in CONTEXT_WEIGHTS
        }
        features = context_features(calibrated, positions) if context_model == "learned" else None
        if context is None:
            radius, weight = max(candidates, key=lambda key: best_balanced_accuracy(labels, candidates[key], rule))
            context = ContextSettings(radius, weight, fit_logistic(features, labels) if features is not None else None)
        if features is not None:
            mixed = learned_context(calibrated, positions, context.linear, features)
            if patients is not None:
                candidates = {"learned": _learned_without_each_patient(calibrated, positions, features, labels, patients)}
        else:
            mixed = candidates[(context.radius, context.weight)]
        context_temperature, context_bias = fit_calibration(labels, mixed)
        probabilities = sigmoid(mixed / context_temperature + context_bias)
        context_mode = scoring_mode(tta=tta, context=True)
        calibrations[context_mode] = Calibration(
            context_temperature, context_bias, probability_threshold(labels, probabilities, rule)
        )
        metrics[context_mode] = classification_metrics(labels, probabilities, calibrations[context_mode].threshold)
        if patients is not None:
            leave_one_out[mode] = {
                "patch": leave_one_patient_out(labels, patients, {"patch": calibrated}, rule),
                "context": leave_one_patient_out(labels, patients, candidates, rule),
            }
    scoring = Scoring(context=context, **calibrations)
    procedure = {"threshold_rule": asdict(rule), "context_model": context_model if positions is not None else None}
    return scoring, Validation(threshold_rule=rule.describe(), metrics=metrics, leave_one_patient_out=leave_one_out, procedure=procedure)


def _learned_without_each_patient(
    logits: np.ndarray, positions: SlidePositions, features: np.ndarray, labels: np.ndarray, patients: np.ndarray
) -> np.ndarray:
    """Each patient's learned-context logits from a regression fitted on the other patients."""
    scores = np.zeros(len(labels))
    for patient in np.unique(patients):
        held = patients == patient
        if labels[~held].all() or not labels[~held].any():
            continue
        linear = fit_logistic(features[~held], labels[~held])
        scores[held] = learned_context(logits, positions, linear, features)[held]
    return scores


def best_balanced_accuracy(labels: np.ndarray, scores: np.ndarray, rule: ThresholdRule = ThresholdRule()) -> float:
    """Balanced accuracy at the threshold `choose_threshold` picks for these scores."""
    return classification_metrics(labels, scores, choose_threshold(labels, scores, rule))["balanced_accuracy"]


def leave_one_patient_out(
    labels: np.ndarray, patients: np.ndarray, candidates: dict, rule: ThresholdRule = ThresholdRule()
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
        best = max(candidates, key=lambda key: best_balanced_accuracy(labels[rest], candidates[key][rest], rule))
        scores = candidates[best]
        calls[held] = scores[held] >= choose_threshold(labels[rest], scores[rest], rule)
    tn, fp, fn, tp = confusion_counts(labels, calls)
    sensitivity, specificity = tp / max(1, tp + fn), tn / max(1, tn + fp)
    return {
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "patients": int(len(np.unique(patients))),
    }


def refitted_per_patient(
    labels: np.ndarray,
    plain_logits: np.ndarray,
    positions: SlidePositions,
    patients: np.ndarray,
    *,
    rule: ThresholdRule = ThresholdRule(),
    context_model: str = "blend",
) -> np.ndarray:
    """Each patient's calls (with slide context, one view) by a scoring fitted with
    fit_scoring on all the other patients: how a calibration on these patients carries over
    to one it was not fitted on, the whole procedure refitted each time."""
    calls = np.zeros(len(labels), dtype=bool)
    for patient in np.unique(patients):
        held = patients == patient
        rest = ~held
        scoring, _ = fit_scoring(labels[rest], plain_logits[rest], plain_logits[rest], positions=positions.take(rest),
                                 rule=rule, context_model=context_model)
        probabilities, threshold = scored(scoring, scoring.plain.calibrated(plain_logits[held]), positions.take(held),
                                          tta=False, context=True)
        calls[held] = probabilities >= threshold
    return calls

