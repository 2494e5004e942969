"""Metric functions against hand-computed values and scikit-learn; threshold and calibration."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn import metrics as sk
from sklearn.linear_model import LogisticRegression

from histoscreen.data import SlidePositions
from histoscreen.scoring.calibration import ThresholdRule, fit_logistic
from histoscreen.scoring.slides import SlideBurden, complete_slides, partial_slide_check, slide_burdens, slide_figures, spearman
from histoscreen.scoring import (
    bootstrap_by_patient,
    choose_threshold,
    classification_metrics,
    confusion_counts,
    expected_calibration_error,
    fit_calibration,
    per_patient_table,
    sigmoid,
)


def test_hand_computed_example():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    m = classification_metrics(labels, probs, threshold=0.5)
    # predicted IDC: 0.9, 0.6, 0.7 -> tp 2, fp 1, fn 1, tn 4
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (4, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # positive-negative pairs ranked right: 0.9 beats all 5, 0.6 beats 4, 0.3 beats 3 -> 12 of 15
    assert m["roc_auc"] == pytest.approx(12 / 15)
    assert m["brier"] == pytest.approx(np.mean((probs - labels) ** 2))


def test_a_class_with_no_positives():
    labels = np.zeros(4, dtype=int)
    probs = np.array([0.1, 0.7, 0.2, 0.3])
    m = classification_metrics(labels, probs, 0.5)
    assert math.isnan(m["sensitivity"]) and math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["specificity"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # the mean of the recalls that exist
    assert m["precision"] == 0.0 and m["f1"] == 0.0
    assert confusion_counts(labels, probs >= 0.5) == (3, 1, 0, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 700)
    probs = np.clip(np.round(rng.random(700) * 0.8 + labels * 0.2, 2), 0, 1)  # rounding makes ties
    m = classification_metrics(labels, probs, 0.45)
    predicted = probs >= 0.45
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, probs))
    assert m["pr_auc"] == pytest.approx(sk.average_precision_score(labels, probs))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, predicted))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert m["f1"] == pytest.approx(sk.f1_score(labels, predicted))
    assert m["precision"] == pytest.approx(sk.precision_score(labels, predicted))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(labels, predicted))
    assert m["brier"] == pytest.approx(sk.brier_score_loss(labels, probs))


def test_threshold_maximises_balanced_accuracy_or_meets_the_sensitivity_floor():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    probs = sigmoid(rng.normal(0, 1, 400) + 1.5 * labels)
    chosen = choose_threshold(labels, probs)
    best_by_brute_force = max(classification_metrics(labels, probs, t)["balanced_accuracy"] for t in np.unique(probs))
    assert classification_metrics(labels, probs, chosen)["balanced_accuracy"] == pytest.approx(best_by_brute_force)
    floor = choose_threshold(labels, probs, ThresholdRule("specificity", min_sensitivity=0.95))
    at_floor = classification_metrics(labels, probs, floor)
    assert at_floor["sensitivity"] >= 0.95
    feasible = [t for t in np.unique(probs) if classification_metrics(labels, probs, t)["sensitivity"] >= 0.95]
    assert at_floor["specificity"] == pytest.approx(max(classification_metrics(labels, probs, t)["specificity"] for t in feasible))


@pytest.mark.parametrize("floor", [0.8, 0.87, 0.9])
def test_the_accuracy_rule_maximises_accuracy_under_both_recall_floors(floor):
    """Constructed scores: 30% IDC, overlapping classes; brute force over every cut."""
    rng = np.random.default_rng(11)
    labels = (rng.random(2000) < 0.3).astype(int)
    scores = rng.normal(0, 1, 2000) + 2.8 * labels
    chosen = choose_threshold(labels, scores, ThresholdRule("accuracy", min_sensitivity=floor, min_specificity=floor))
    got = classification_metrics(labels, scores, chosen)
    assert got["sensitivity"] >= floor and got["specificity"] >= floor
    feasible = [classification_metrics(labels, scores, t) for t in np.unique(scores)]
    feasible = [m for m in feasible if m["sensitivity"] >= floor and m["specificity"] >= floor]
    assert feasible  # the floors can be met on these scores
    assert got["accuracy"] == pytest.approx(max(m["accuracy"] for m in feasible))
    # without floors the accuracy rule gives up sensitivity for the majority class
    free = classification_metrics(labels, scores, choose_threshold(labels, scores, ThresholdRule("accuracy")))
    balanced = classification_metrics(labels, scores, choose_threshold(labels, scores))
    assert free["accuracy"] >= balanced["accuracy"] and free["sensitivity"] <= balanced["sensitivity"]


def test_an_impossible_floor_falls_back_to_balanced_accuracy():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.7, 0.3, 0.9, 0.2, 0.8])
    impossible = ThresholdRule("accuracy", min_sensitivity=1.0, min_specificity=1.0)
    assert choose_threshold(labels, scores, impossible) == choose_threshold(labels, scores)
    assert ThresholdRule("accuracy", 0.87, 0.87).describe() == "max accuracy with sensitivity >= 0.87 and specificity >= 0.87"


def test_calibration_matches_logistic_regression_and_lowers_ece():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(-1, 2, 5000)
    labels = (rng.random(5000) < sigmoid(true_logits)).astype(int)
    overconfident = 3 * true_logits + 2  # a model too sure of itself, shifted like a weighted loss
    temperature, bias = fit_calibration(labels, overconfident)
    reference = LogisticRegression(C=1e9, max_iter=1000).fit(overconfident[:, None], labels)
    assert 1 / temperature == pytest.approx(reference.coef_[0, 0], rel=1e-3)
    assert bias == pytest.approx(reference.intercept_[0], rel=1e-3, abs=1e-3)
    assert temperature == pytest.approx(3, rel=0.1)
    before = expected_calibration_error(labels, sigmoid(overconfident))
    after = expected_calibration_error(labels, sigmoid(overconfident / temperature + bias))
    assert after < before / 3


def test_the_learned_context_regression_matches_scikit_learn():
    """fit_logistic is scikit-learn's default logistic regression (C = 1) on standardised
    columns, with its weights given back for the raw columns."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    features = rng.normal(size=(4000, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, 0.5, 0, 1]
    features[:, 4] = 1.0  # a constant column is harmless
    labels = (rng.random(4000) < sigmoid(features[:, :4] @ [1.5, -0.2, 8.0, 0.0] - 3.0)).astype(int)
    weights = np.array(fit_logistic(features, labels))
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=1e-10)).fit(features, labels)
    np.testing.assert_allclose(features @ weights[:-1] + weights[-1], reference.decision_function(features), atol=1e-4)
    assert weights[2] == pytest.approx(8.0, rel=0.15) and abs(weights[3]) < 0.1


def test_patient_bootstrap_brackets_the_estimate_and_is_wider_than_patch_resampling():
    rng = np.random.default_rng(7)
    patients = np.repeat([f"p{i}" for i in range(12)], 60)
    # patients differ: each has its own offset, so patches of one patient are correlated
    offsets = np.repeat(rng.normal(0, 1.5, 12), 60)
    labels = rng.integers(0, 2, len(patients))
    probs = sigmoid(2 * (labels - 0.5) + offsets + rng.normal(0, 0.5, len(patients)))
    point = classification_metrics(labels, probs, 0.5)
    by_patient = bootstrap_by_patient(labels, probs, patients, 0.5, rounds=300)
    by_patch = bootstrap_by_patient(labels, probs, np.arange(len(patients)), 0.5, rounds=300)
    for name in ("accuracy", "roc_auc"):
        assert by_patient[name].low <= point[name] <= by_patient[name].high
        assert by_patient[name].high - by_patient[name].low > by_patch[name].high - by_patch[name].low


def test_per_patient_table():
    table = per_patient_table(np.array([1, 0, 0, 1]), np.array([0.9, 0.8, 0.1, 0.2]), np.array(["a", "a", "b", "b"]), 0.5)
    a, b = table.set_index("patient").loc["a"], table.set_index("patient").loc["b"]
    assert (a.patches, a.accuracy, a.sensitivity, a.specificity) == (2, 0.5, 1.0, 0.0)
    assert (b.true_idc_fraction, b.predicted_idc_fraction) == (0.5, 0.0)


@pytest.mark.parametrize(
    "labels, probabilities, words",
    [
        ([0, 1, 1], [0.2, 0.9], "labels has 3 values but probabilities has 2"),
        ([0, 2, 1], [0.2, 0.9, 0.5], "labels must be 0 (non-IDC) or 1 (IDC)"),
        ([0, 1], [0.2, float("nan")], "probabilities holds 1 values that are not finite"),
        ([[0, 1]], [[0.2, 0.9]], "labels must be one-dimensional"),
        ([0, 1], ["a", "b"], "probabilities must be numbers"),
    ],
)
def test_metrics_check_their_arguments(labels, probabilities, words):
    from histoscreen.errors import ArgumentError

    with pytest.raises(ArgumentError, match=re.escape(words)):
        classification_metrics(labels, probabilities, 0.5)


def test_bootstrap_checks_patients_and_rounds():
    from histoscreen.errors import ArgumentError

    with pytest.raises(ArgumentError, match="patients has 2"):
        bootstrap_by_patient([0, 1, 1], [0.1, 0.8, 0.7], np.array(["a", "b"]), 0.5)
    with pytest.raises(ArgumentError, match="rounds must be at least 1"):
        bootstrap_by_patient([0, 1], [0.1, 0.8], np.array(["a", "b"]), 0.5, rounds=0)


# Slide figures (scoring/slides.py), by hand.
def grid_positions(cells: list[tuple[str, int, int]]) -> SlidePositions:
    return SlidePositions.of([s for s, _, _ in cells], [50 * c + 1 for _, c, _ in cells], [50 * r + 1 for _, _, r in cells])


def test_a_solid_slide_is_complete_and_scattered_or_class_sampled_ones_are_not():
    solid = [("solid", c, r) for c in range(8) for r in range(8)]
    every_other = [("sparse", c, r) for c in range(16) for r in range(16) if (c + r) % 2 == 0]
    tumour = [("sampled", c, r) for c in range(14) for r in range(14)]  # every IDC patch of a solid block...
    around = [("sampled", c, r) for c in range(16, 36, 4) for r in range(0, 16, 4)]  # ...and a sample of the rest
    cells = solid + every_other + tumour + around
    labels = np.array([0] * len(solid) + [0] * len(every_other) + [1] * len(tumour) + [0] * len(around))
    assert complete_slides(grid_positions(cells), labels) == {"solid": True, "sparse": False, "sampled": False}


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    first, second = rng.integers(0, 6, 40), rng.random(40).round(1)
    assert spearman(first, second) == pytest.approx(spearmanr(first, second).statistic, abs=1e-12)


def test_an_idc_slide_is_under_called_below_half_its_true_burden():
    burdens = [SlideBurden("a", 0.40, 0.19), SlideBurden("b", 0.40, 0.20), SlideBurden("c", 0.19, 0.0), SlideBurden("d", 0.02, 0.05)]
    figures = slide_figures(burdens)
    assert figures["under_called"] == ["a"]  # b is at half exactly; c is not an IDC slide (below 0.20)
    assert figures["idc_slides"] == 2
    assert figures["worst_idc_rank"] == 2  # by burden: b 0.20, a 0.19, d 0.05, c 0.0
    assert figures["burden_mae"] == pytest.approx((0.21 + 0.20 + 0.19 + 0.03) / 4)


def test_slide_burdens_count_calls_per_slide():
    burdens = slide_burdens(np.array(["x", "x", "x", "x", "y"]), np.array([1, 1, 0, 0, 0]), np.array([1, 0, 0, 0, 1]), only={"x"})
    assert burdens == [SlideBurden("x", 0.5, 0.25)]


def test_the_partial_slide_check_sees_a_context_that_depends_on_the_rest_of_the_slide():
    positions = grid_positions([("s", c, r) for c in range(9) for r in range(9)])
    rng = np.random.default_rng(0)
    labels = (rng.random(81) < 0.4).astype(int)
    logits = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 0.8, 81)

    def alone(rows):  # each patch on its own: nothing to lose on a partial slide
        return 1 / (1 + np.exp(-logits[rows])), 0.5

    def against_the_slide(rows):  # each patch against its slide's mean: depends on who else is there
        return 1 / (1 + np.exp(-(logits[rows] - 3 * logits[rows].mean()))), 0.5

    steady = partial_slide_check(alone, positions.slides, labels, {"s"})
    assert steady["agreement"] == 1 and steady["accuracy_change"] == 0 and steady["burden_change_max"] == 0
    moved = partial_slide_check(against_the_slide, positions.slides, labels, {"s"})
    assert moved["agreement"] < 1 and moved["burden_change_max"] > 0


def test_a_scoring_with_part_of_a_context_is_refused():
    from histoscreen.scoring.settings import Calibration, ContextSettings, Scoring

    whole = dict(context=ContextSettings(3, 0.7), context_plain=Calibration(), context_tta=Calibration())
    assert Scoring(**whole).has_context
    for missing in whole:
        with pytest.raises(ValueError, match="go together"):
            Scoring(**{k: v for k, v in whole.items() if k != missing})


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_a_spreadsheet_would_run_are_neutralised_whatever_they_start_with(tmp_path, start):
    import csv

    from histoscreen.tables import write_csv

    hostile = f"{start}HYPERLINK(\"http://evil.example\")"
    write_csv(tmp_path / "t.csv", ["where", "count"], [[hostile, -3], ["plain", 2]])
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[1][0] == "'" + hostile and rows[1][1] == "-3"  # numbers stay numbers, negative ones too
    assert rows[2] == ["plain", "2"]


def test_data_frames_are_written_with_text_cells_neutralised_and_no_index(tmp_path):
    import csv

    import pandas as pd

    from histoscreen.tables import write_frame

    frame = pd.DataFrame({"path": ["=cmd|' /C calc'!A0", "/data/900000_idx5_x1_y1_class0.png"],
                          "patient": pd.Series(["@SUM(1)", "900000"], dtype="string"), "prob_idc": [-0.5, 0.25]})
    write_frame(tmp_path / "f.csv", frame)
    with open(tmp_path / "f.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "patient", "prob_idc"]  # no index column
    assert rows[1] == ["'=cmd|' /C calc'!A0", "'@SUM(1)", "-0.5"] and rows[2] == ["/data/900000_idx5_x1_y1_class0.png", "900000", "0.25"]
