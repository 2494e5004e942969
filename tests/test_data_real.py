"""Real patches of the official val patients (skipped when ../shared is absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from histoscreen.constants import PATCH_SIZE
from histoscreen.data import PatchStore, official_split, prepare
from histoscreen.runtime import Predictor
from histoscreen.scoring import sigmoid
from conftest import evaluate_to


def test_prepare_real_val_patches_matches_what_unpack_wrote(real_val_patches, tmp_path):
    folder, expected = real_val_patches
    summary = prepare(folder, tmp_path / "store")
    store = PatchStore(tmp_path / "store")

    assert summary.rejects == [] and summary.conflicts == [] and summary.duplicates == 0
    stored = Counter(zip(store.index.patient, store.index.label.astype(str)))
    assert stored == expected
    assert len(store) == sum(expected.values())
    assert set(store.patients) == official_split().val  # all 29 official val patients
    # Real edge patches are smaller than 50x50 and keep their true size.
    edge = store.index[(store.index.width < PATCH_SIZE) | (store.index.height < PATCH_SIZE)]
    assert len(edge) > 0 and (edge.width >= 1).all() and (edge.height >= 1).all()


def test_the_shipped_model_reproduces_its_model_card_on_the_real_val_patients(real_full_val_patches, tmp_path):
    """The figures the README and model card claim, recomputed from the real patches of the
    val patients at full density (what its scoring was fitted on, so in-sample); with slide
    context both recalls stay above 0.90 there."""
    prepare(real_full_val_patches, tmp_path / "store")
    recorded = Predictor().metadata.validation.metrics
    for context, key in ((False, "plain"), (True, "context_plain")):
        report = evaluate_to(tmp_path / "store", tmp_path / key, split="val", context=context, bootstrap_rounds=50, backend="torch")
        assert report["metrics"]["patches"] == recorded[key]["patches"] == 14_883
        for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc"):
            assert report["metrics"][name] == pytest.approx(recorded[key][name], abs=1e-3), (key, name)
    metrics = report["metrics"]
    assert metrics["sensitivity"] >= 0.90 and metrics["specificity"] >= 0.90 and metrics["roc_auc"] >= 0.97


def test_the_shipped_context_gives_probabilities_to_lone_and_unplaced_real_patches(real_val_patches, tmp_path):
    """One patch of a slide, a sparse sample of one, and patches with no place: finite
    probabilities strictly between 0 and 1, and no patch without a place moved by context."""
    from histoscreen.data import SlidePositions, StoreSource

    folder, _ = real_val_patches
    prepare(folder, tmp_path / "store")
    batch = StoreSource(PatchStore(tmp_path / "store")).read_all()
    predictor = Predictor(backend="torch")
    patient = batch.patients == batch.patients[0]
    for chosen in (np.flatnonzero(patient)[:1], np.flatnonzero(patient)[::25], np.arange(len(batch))[::50]):
        positions = SlidePositions.of(batch.patients[chosen], batch.xs[chosen], batch.ys[chosen])
        probabilities = predictor.probabilities(batch.pixels[chosen], positions)
        assert np.isfinite(probabilities).all() and ((probabilities > 0) & (probabilities < 1)).all()
    unplaced = predictor.probabilities(batch.pixels[:300])
    calibration = predictor.context_calibration
    np.testing.assert_allclose(unplaced, sigmoid(calibration.calibrated(predictor.patch_logits(batch.pixels[:300]))), atol=1e-6)
