"""Prediction: calibration and threshold applied as stored, folders with bad files, the shipped model."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from histoscreen.data import PatchStore, synthesize
from histoscreen.scoring import sigmoid
from histoscreen.models import shipped_model_path
from histoscreen.runtime import Predictor
from conftest import predict_to_csv
from histoscreen.models import load_model
from histoscreen.runtime import batched_logits


def read_predictions(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_applies_the_stored_temperature_bias_and_threshold(edited_tiny_model, synthetic_store, tmp_path):
    model_dir = edited_tiny_model(
        lambda metadata: metadata["scoring"].update(plain=dict(temperature=2.5, bias=-0.3, threshold=0.4),
                                                    tta=dict(temperature=0.5, bias=0.2, threshold=0.6))
    )

    store = PatchStore(synthetic_store)
    model, loaded = load_model(model_dir)
    for tta, (temperature, bias, threshold) in ((False, (2.5, -0.3, 0.4)), (True, (0.5, 0.2, 0.6))):
        predict_to_csv([synthetic_store], tmp_path / "preds.csv", model=model_dir, tta=tta, context=False, backend="torch")
        rows = read_predictions(tmp_path / "preds.csv")
        expected = sigmoid(batched_logits(model, store.patches[:], loaded.normalisation, tta=tta) / temperature + bias)
        got = np.array([float(r["prob_idc"]) for r in rows])
        np.testing.assert_allclose(got, expected, atol=2e-6)
        assert [int(r["pred"]) for r in rows] == (expected >= threshold).astype(int).tolist()
        assert 0 < sum(int(r["pred"]) for r in rows) < len(rows)


def test_predict_on_a_folder_with_a_corrupt_file(tiny_model, tmp_path):
    synthesize(tmp_path / "slides", patients=1, seed=2)
    files = sorted((tmp_path / "slides").rglob("*.png"))
    broken = files[3]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    loose = tmp_path / "loose" / "scan.png"  # a valid patch whose name does not parse
    loose.parent.mkdir()
    shutil.copy(files[0], loose)

    summary = predict_to_csv([tmp_path / "slides", loose], tmp_path / "out" / "preds.csv", model=tiny_model, context=False)

    rows = read_predictions(tmp_path / "out" / "preds.csv")
    assert len(summary.rows) == len(rows) == len(files)  # all but the broken one, plus the loose one
    assert str(broken) not in {r["path"] for r in rows}
    unparsed = next(r for r in rows if r["path"] == str(loose))
    assert (unparsed["patient"], unparsed["x"], unparsed["y"]) == ("", "", "")
    parsed = next(r for r in rows if r["path"] == str(files[0]))
    assert parsed["patient"] == "900000" and parsed["x"] and parsed["y"]
    assert float(parsed["prob_idc"]) == pytest.approx(float(unparsed["prob_idc"]))
    rejects = read_predictions(tmp_path / "out" / "preds.rejects.csv")
    assert [r["path"] for r in rejects] == [str(broken)] and "truncated" in rejects[0]["reason"]


def test_the_shipped_model_loads_and_predicts_on_synthetic_patches(synthetic_store):
    assert shipped_model_path().is_file(), "the shipped model is missing from the package"
    predictor = Predictor()
    probabilities = predictor.probabilities(PatchStore(synthetic_store).patches[:64])
    assert probabilities.shape == (64,) and np.isfinite(probabilities).all()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert predictor.metadata.training["train_patches"] > 20000  # trained on the real train patients


def test_the_default_is_slide_context_and_sparse_or_unplaced_patches_stay_finite(synthetic_archive, tmp_path):
    from histoscreen.tasks import predict

    patches = sorted(p for p in synthetic_archive.rglob("*.png") if "IDC_regular" not in str(p))
    loose = tmp_path / "scan.png"  # a name that gives no place
    shutil.copy(patches[0], loose)
    sparse = tmp_path / "sparse"
    for path in patches[::9]:  # every ninth patch: most have no neighbour within the radius
        target = sparse / path.relative_to(synthetic_archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    for inputs in ([patches[0]], [loose], [sparse]):
        predictions = predict(inputs)
        probabilities = predictions.rows["prob_idc"].to_numpy()
        assert predictions.settings["context"] is True
        assert len(probabilities) and np.isfinite(probabilities).all() and ((probabilities > 0) & (probabilities < 1)).all()
    alone = predict([sparse], context=False)
    assert alone.settings["context"] is False
