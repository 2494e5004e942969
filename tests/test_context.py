"""Slide context: neighbours on the grid, its calibration on val patients, and that
predict, evaluate, calibrate and screen apply it as stored."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from histoscreen import HistoscreenError
from histoscreen.data import PatchStore, SplitSpec, prepare, synthesize
from histoscreen.scoring import sigmoid
from histoscreen.runtime import Predictor
from conftest import evaluate_to, predict_to_csv
from histoscreen.models import load_model
from histoscreen.data import SlidePositions
from histoscreen.data.sources import NO_SLIDE, UNKNOWN_COORDINATE
from histoscreen.scoring.context import (
    CONTEXT_FEATURES,
    CONTEXT_RADII,
    CONTEXT_WEIGHTS,
    blend_with_neighbours,
    context_features,
    learned_context,
    neighbour_means,
)
from histoscreen.tasks import calibrate
from test_cli import histoscreen


def at(column: int, row: int) -> tuple[int, int]:
    return column * 50 + 1, row * 50 + 1


def hand_made_positions() -> tuple[np.ndarray, SlidePositions]:
    cells = [("A", 0, 0), ("A", 1, 0), ("A", 1, 1), ("A", 3, 3), ("B", 0, 0)]
    patients = [p for p, _, _ in cells] + [NO_SLIDE]
    xs = [at(c, r)[0] for _, c, r in cells] + [UNKNOWN_COORDINATE]
    ys = [at(c, r)[1] for _, c, r in cells] + [UNKNOWN_COORDINATE]
    logits = np.array([1.0, 3.0, 5.0, 7.0, 100.0, 50.0])
    return logits, SlidePositions.of(patients, xs, ys)


def test_neighbour_means_by_hand():
    logits, positions = hand_made_positions()
    means, counts = neighbour_means(logits, positions, radius=1)
    # A(0,0) sees A(1,0) and A(1,1); A(3,3) is two cells from A(1,1); B is another slide; the last has no position
    np.testing.assert_allclose(means, [4.0, 3.0, 2.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(counts, [2, 2, 2, 0, 0, 0])
    means, counts = neighbour_means(logits, positions, radius=2)
    np.testing.assert_allclose(means, [4.0, 3.0, 11 / 3, 5.0, 0.0, 0.0])  # A(1,1) and A(3,3) now see each other
    np.testing.assert_array_equal(counts, [2, 2, 3, 1, 0, 0])


def test_blending_moves_towards_the_neighbours_and_leaves_loners_alone():
    logits, positions = hand_made_positions()
    blended = blend_with_neighbours(logits, positions, radius=1, weight=0.5)
    np.testing.assert_allclose(blended, [2.5, 3.0, 3.5, 7.0, 100.0, 50.0])


def test_training_fits_the_context_on_val_patients(tiny_model):
    _, metadata = load_model(tiny_model)
    scoring = metadata.scoring
    assert scoring.context.radius in CONTEXT_RADII and scoring.context.weight in CONTEXT_WEIGHTS
    assert 0 < scoring.context_plain.threshold < 1 and 0 < scoring.context_tta.threshold < 1 and scoring.context_plain.temperature > 0
    for mode in ("plain", "tta"):
        assert metadata.validation.metrics[f"context_{mode}"]["patches"] == metadata.training["val_patches"]
        estimate = metadata.validation.leave_one_patient_out[mode]
        assert estimate["context"]["patients"] == len(metadata.training["val_patients"])
        assert 0 <= estimate["patch"]["balanced_accuracy"] <= 1


def read_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_with_context_applies_the_stored_context(edited_tiny_model, synthetic_store, tmp_path):
    model_dir = edited_tiny_model(
        lambda metadata: (metadata["scoring"]["context"].update(radius=1, weight=0.6),
                          metadata["scoring"]["context_plain"].update(temperature=1.7, bias=-0.2, threshold=0.45))
    )

    predict_to_csv([synthetic_store], tmp_path / "preds.csv", model=model_dir, context=True, backend="torch")

    store = PatchStore(synthetic_store)
    predictor = Predictor(model_dir, backend="torch")
    positions = SlidePositions.of(store.index["patient"].tolist(), store.index["x"].tolist(), store.index["y"].tolist())
    expected = sigmoid(blend_with_neighbours(predictor.patch_logits(store.patches[:]), positions, 1, 0.6) / 1.7 - 0.2)
    rows = read_rows(tmp_path / "preds.csv")
    np.testing.assert_allclose([float(r["prob_idc"]) for r in rows], expected, atol=2e-6)
    assert [int(r["pred"]) for r in rows] == (expected >= 0.45).astype(int).tolist()
    on_own = read_rows_after([synthetic_store], tmp_path / "own.csv", model_dir, context=False)
    assert [r["prob_idc"] for r in on_own] != [r["prob_idc"] for r in rows]


def read_rows_after(inputs, out, model, **options) -> list[dict]:
    predict_to_csv(inputs, out, model=model, backend="torch", **options)
    return read_rows(out)


def test_context_does_not_depend_on_batching_or_input_form(tiny_model, tmp_path):
    """Neighbours read in a later batch, or from PNG files instead of a store, count the same."""
    synthesize(tmp_path / "slides", patients=2, seed=8, first_index=40)
    prepare(tmp_path / "slides", tmp_path / "store")
    from_store = read_rows_after([tmp_path / "store"], tmp_path / "a.csv", tiny_model, context=True, batch_size=4096)
    from_files = read_rows_after([tmp_path / "slides"], tmp_path / "b.csv", tiny_model, context=True, batch_size=7)
    key = lambda r: (r["patient"], int(r["x"]), int(r["y"]))  # noqa: E731
    store_probabilities = {key(r): float(r["prob_idc"]) for r in from_store}
    assert len(from_files) == len(from_store)
    for row in from_files:
        assert float(row["prob_idc"]) == pytest.approx(store_probabilities[key(row)], abs=1e-5)


def test_a_model_without_context_refuses_context_clearly(edited_tiny_model):
    model_dir = edited_tiny_model(lambda metadata: metadata["scoring"].update(context=None, context_plain=None, context_tta=None))
    with pytest.raises(HistoscreenError, match="histoscreen calibrate"):
        Predictor(model_dir, context=True)


def test_evaluate_with_context_reports_its_settings(tiny_model, synthetic_store, tmp_path):
    spec = SplitSpec("kfold", folds=3, fold=1, seed=0)
    plain = evaluate_to(synthetic_store, tmp_path / "plain", model=tiny_model, split="val", split_spec=spec, bootstrap_rounds=20,
                        context=False)
    context = evaluate_to(synthetic_store, tmp_path / "context", model=tiny_model, split="val", split_spec=spec,
                          bootstrap_rounds=20, context=True)
    _, metadata = load_model(tiny_model)
    assert plain["context"] is False and context["context"] is True
    assert context["threshold"] == metadata.scoring.context_plain.threshold
    assert context["context_settings"]["radius"] == metadata.scoring.context.radius
    # the same val patients the context was fitted on, so the same figures
    assert context["metrics"]["balanced_accuracy"] == pytest.approx(metadata.validation.metrics["context_plain"]["balanced_accuracy"])
    assert json.loads((tmp_path / "context" / "metrics.json").read_text())["context"] is True


def test_calibrate_refits_on_val_patients_and_keeps_the_weights(tiny_model, synthetic_store, tmp_path):
    result = histoscreen(
        "calibrate", str(synthetic_store), "--model", str(tiny_model), "--out", str(tmp_path / "recalibrated"),
        "--split-scheme", "kfold", "--folds", "3", "--fold", "2", "--threshold-objective", "specificity", "--min-sensitivity", "0.95",
    )
    assert result.returncode == 0, result.stderr
    assert "with slide context" in result.stdout
    _, before = load_model(tiny_model)
    _, after = load_model(tmp_path / "recalibrated")
    assert after.validation.threshold_rule == "max specificity with sensitivity >= 0.95"
    assert after.validation.split == "kfold-2-of-3/val"
    assert list(after.validation.patients) != before.training["val_patients"]  # another fold's patients
    assert after.scoring.has_context and after.validation.metrics["context_plain"]["sensitivity"] >= 0.95
    assert after.training == before.training
    old, new = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "recalibrated" / "model.safetensors")
    assert old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)


def test_calibrate_refuses_a_split_without_val_patients(tiny_model, synthetic_store, tmp_path):
    with pytest.raises(HistoscreenError, match="no patches of the val patients"):
        calibrate(synthetic_store, tiny_model)  # synthetic patients are in no official list


def test_context_features_by_hand():
    logits, positions = hand_made_positions()
    features = dict(zip(CONTEXT_FEATURES, context_features(logits, positions).T))
    np.testing.assert_allclose(features["neighbour mean r1"], [4.0, 3.0, 2.0, 7.0, 100.0, 50.0])  # no neighbours: its own
    np.testing.assert_allclose(features["neighbour share r1"], np.array([2, 2, 2, 0, 0, 0]) / 8)
    np.testing.assert_allclose(features["neighbour mean r2"][:4], [4.0, 3.0, 11 / 3, 5.0])
    np.testing.assert_allclose(features["highest neighbour r1"], [5.0, 5.0, 3.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(features["lowest neighbour r1"], [3.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(features["spread r2"][:2], [np.std([1.0, 3.0, 5.0])] * 2)
    np.testing.assert_allclose(features["spread r2"][4:], [0.0, 0.0])  # alone in its window
    np.testing.assert_allclose(features["slide median"], [4.0] * 4 + [100.0, 50.0])
    np.testing.assert_allclose(features["slide 90th percentile"][:4], [np.quantile([1.0, 3, 5, 7], 0.9)] * 4)
    np.testing.assert_allclose(features["slide 10th percentile"][:4], [np.quantile([1.0, 3, 5, 7], 0.1)] * 4)
    np.testing.assert_allclose(features["slide 10th percentile"][4:], [100.0, 50.0])  # a slide of one
    np.testing.assert_allclose(features["slide mean probability"][:4], [np.mean(sigmoid(np.array([1.0, 3, 5, 7])))] * 4)


def test_the_learned_context_weighs_its_features_and_leaves_unplaced_patches_alone():
    logits, positions = hand_made_positions()
    rng = np.random.default_rng(0)
    linear = tuple(rng.normal(size=len(CONTEXT_FEATURES) + 1))
    got = learned_context(logits, positions, linear)
    expected = context_features(logits, positions) @ np.array(linear[:-1]) + linear[-1]
    np.testing.assert_allclose(got[:5], expected[:5])
    assert got[5] == logits[5]  # its name gave no place


def test_calibrate_learns_the_context_and_predict_applies_it(tiny_model, synthetic_store, tmp_path):
    result = histoscreen(
        "calibrate", str(synthetic_store), "--model", str(tiny_model), "--out", str(tmp_path / "learned"),
        "--split-scheme", "kfold", "--folds", "3", "--fold", "2", "--context-model", "learned",
        "--threshold-objective", "accuracy", "--min-sensitivity", "0.9", "--min-specificity", "0.8",
    )
    assert result.returncode == 0, result.stderr
    assert "with slide context (learned)" in result.stdout
    _, metadata = load_model(tmp_path / "learned")
    assert len(metadata.scoring.context.linear) == len(CONTEXT_FEATURES) + 1
    assert metadata.validation.leave_one_patient_out["plain"]["context"]["patients"] == len(metadata.validation.patients)

    predict_to_csv([synthetic_store], tmp_path / "preds.csv", model=tmp_path / "learned", context=True, backend="torch")
    store = PatchStore(synthetic_store)
    predictor = Predictor(tmp_path / "learned", backend="torch")
    positions = SlidePositions.of(store.index["patient"].tolist(), store.index["x"].tolist(), store.index["y"].tolist())
    context = predictor.context_calibration
    expected = sigmoid(context.calibrated(learned_context(predictor.patch_logits(store.patches[:]), positions,
                                                          metadata.scoring.context.linear)))
    rows = read_rows(tmp_path / "preds.csv")
    np.testing.assert_allclose([float(r["prob_idc"]) for r in rows], expected, atol=2e-6)
    assert [int(r["pred"]) for r in rows] == (expected >= context.threshold).astype(int).tolist()

    # one patch, a sparse handful, and patches whose place is unknown: finite probabilities
    patches = store.patches[:]
    for chosen in (np.array([0]), np.arange(0, len(store), 97)):
        alone = predictor.probabilities(patches[chosen], SlidePositions.of(*(np.asarray(v)[chosen] for v in (
            store.index["patient"], store.index["x"], store.index["y"]))))
        assert np.isfinite(alone).all() and ((alone >= 0) & (alone <= 1)).all()  # a tiny model on synthetic slides may saturate
    unplaced = predictor.probabilities(patches[:50])
    np.testing.assert_allclose(unplaced, sigmoid(context.calibrated(predictor.patch_logits(patches[:50]))), atol=1e-6)


def test_a_learned_context_of_the_wrong_size_is_refused_clearly(edited_tiny_model):
    model_dir = edited_tiny_model(lambda metadata: metadata["scoring"]["context"].update(linear=[0.5, 1.0, 0.0]))
    with pytest.raises(HistoscreenError, match="learned slide context has 3 weights"):
        Predictor(model_dir)


def test_each_patients_learned_context_estimate_never_sees_its_own_labels():
    from histoscreen.scoring.calibration import _learned_without_each_patient

    rng = np.random.default_rng(4)
    patients = np.repeat(np.array(["900000", "900001", "900002", "900003"]), 60)
    xs = np.tile(np.arange(60) % 10 * 50 + 1, 4)
    ys = np.tile(np.arange(60) // 10 * 50 + 1, 4)
    positions = SlidePositions.of(patients, xs, ys)
    labels = (rng.random(240) < 0.4).astype(np.int64)
    logits = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.5, 240)
    features = context_features(logits, positions)
    before = _learned_without_each_patient(logits, positions, features, labels, patients)
    flipped = labels.copy()
    held = patients == "900002"
    flipped[held] = 1 - flipped[held]  # what that patient's truth is must not move its own estimate
    after = _learned_without_each_patient(logits, positions, features, flipped, patients)
    np.testing.assert_array_equal(before[held], after[held])
    assert not np.allclose(before[~held], after[~held])  # the others learned from the flipped labels


def test_calibrating_on_a_labs_own_patients_says_what_the_refit_is_worth_before_use(tiny_model, synthetic_store, tmp_path):
    """--split-scheme all: every patient calibrates, and the model carries the figures there
    of the model it started from and of the refit, each patient called by a fit on the others."""
    from histoscreen.tasks.calibrate import call_figures

    result = histoscreen("calibrate", str(synthetic_store), "--model", str(tiny_model), "--out", str(tmp_path / "lab"),
                         "--split-scheme", "all")
    assert result.returncode == 0, result.stderr
    _, metadata = load_model(tmp_path / "lab")
    estimate = metadata.validation.estimate
    assert metadata.validation.split == "all/val" and len(metadata.validation.patients) == estimate["patients"] == 6
    assert f"on these 6 patients, the model you started from: balanced accuracy {estimate['before']['balanced_accuracy']:.4f}" in result.stdout
    assert f"this refit (each patient called by a refit on the others): balanced accuracy {estimate['after']['balanced_accuracy']:.4f}" in result.stdout
    better = estimate["after"]["balanced_accuracy"] > estimate["before"]["balanced_accuracy"]
    assert ("warning: the refit is not estimated to be better" in result.stdout) != (better and len(estimate["after"]["under_called"]) <= len(estimate["before"]["under_called"]))

    # "before" is the starting model's own calls on these patches, as predict makes them
    from histoscreen.data import PatchStore, StoreSource
    from histoscreen.runtime import Predictor
    from histoscreen.scoring.slides import complete_slides

    patches = StoreSource(PatchStore(synthetic_store)).read_all()
    calls = Predictor(tiny_model, backend="torch").probabilities(patches.pixels, patches.positions) >= Predictor(tiny_model).threshold
    expected = call_figures(patches.labels.astype(int), calls, patches.patients.astype(str),
                            complete_slides(patches.positions, patches.labels))
    assert estimate["before"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-6)


def test_each_patients_refit_call_comes_from_a_fit_without_that_patient():
    from histoscreen.data import SlidePositions
    from histoscreen.scoring.calibration import fit_scoring, refitted_per_patient, scored

    rng = np.random.default_rng(3)
    patients = np.repeat(np.array(["a", "b", "c", "d", "e"]), 60)
    labels = (rng.random(len(patients)) < 0.4).astype(int)
    logits = np.where(labels == 1, 1.0, -1.0) * rng.uniform(0.2, 2.0, len(labels)) + rng.normal(0, 1.0, len(labels))
    logits[patients == "c"] += 1.5  # a patient whose logits run high: its own threshold would differ
    xs, ys = np.tile(np.arange(60) % 10 * 50 + 1, 5), np.tile(np.arange(60) // 10 * 50 + 1, 5)
    positions = SlidePositions.of(patients, xs, ys)
    calls = refitted_per_patient(labels, logits, positions, patients)
    held = patients == "c"
    scoring, _ = fit_scoring(labels[~held], logits[~held], logits[~held], positions=positions.take(~held))
    probabilities, threshold = scored(scoring, scoring.plain.calibrated(logits[held]), positions.take(held), tta=False, context=True)
    assert np.array_equal(calls[held], probabilities >= threshold)
    everyone, _ = fit_scoring(labels, logits, logits, positions=positions)
    with_c, threshold_c = scored(everyone, everyone.plain.calibrated(logits[held]), positions.take(held), tta=False, context=True)
    assert not np.array_equal(calls[held], with_c >= threshold_c)  # a fit that saw patient c calls it otherwise


@pytest.mark.parametrize("patients, idc_fractions, words", [
    (4, [0.3, 0.3, 0.3, 0.3], "4 patients; calibrating on a lab's own needs at least 5"),
    (5, [0.3, 0.0, 0.0, 0.0, 0.0], "every IDC patch is one patient's"),
])
def test_calibrating_on_too_few_lab_patients_is_refused_with_the_reason(tiny_model, tmp_path, patients, idc_fractions, words):
    from histoscreen.data import prepare, synthesize

    synthesize(tmp_path / "slides", patients=patients, seed=4, first_index=50, idc_fractions=idc_fractions)
    prepare(tmp_path / "slides", tmp_path / "store")
    result = histoscreen("calibrate", str(tmp_path / "store"), "--model", str(tiny_model), "--out", str(tmp_path / "lab"),
                         "--split-scheme", "all")
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "lab").exists()
