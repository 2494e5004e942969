"""The shipped model's predictions on the real val patients are pinned: restructuring the
code must not move a single call, nor any probability by more than 1e-6.

tests/data/shipped_model_val_predictions.npz holds the probabilities (not the patches) the
shipped model gave every val patch in val.zip, per scoring mode and backend, with the
SHA-256 of the weights they came from. When a new model ships, regenerate it:

    python tests/test_shipped_pin.py .cache/real-idc/val
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

PIN = Path(__file__).resolve().parent / "data" / "shipped_model_val_predictions.npz"
# (backend, tta, context) of each pinned array
MODES = {
    "torch_plain": ("torch", False, False),
    "torch_context": ("torch", False, True),
    "onnx_context": ("onnx", False, True),
    "torch_context_tta": ("torch", True, True),
}


def shipped_predictions(store_path: Path) -> dict[str, np.ndarray]:
    from histoscreen.data import PatchStore, StoreSource
    from histoscreen.runtime import Predictor

    store = PatchStore(store_path)
    batch = StoreSource(store).read_all()
    predictions = {}
    for key, (backend, tta, context) in MODES.items():
        predictor = Predictor(backend=backend, tta=tta, context=context)
        predictions[key] = predictor.probabilities(batch.pixels, batch.positions)
    predictions["positions"] = (batch.patients, batch.xs, batch.ys)
    return predictions


def weights_digest() -> str:
    from histoscreen.models import shipped_model_path

    return hashlib.sha256(shipped_model_path().read_bytes()).hexdigest()


def test_the_shipped_model_gives_the_pinned_predictions_on_the_real_val_patients(real_val_patches, tmp_path):
    from histoscreen.data import prepare
    from histoscreen.runtime import Predictor

    pinned = np.load(PIN)
    assert str(pinned["weights_sha256"]) == weights_digest(), (
        "the shipped weights changed: regenerate the pin with `python tests/test_shipped_pin.py VAL_FOLDER`"
    )
    folder, _ = real_val_patches
    prepare(folder, tmp_path / "store")
    got = shipped_predictions(tmp_path / "store")
    patients, xs, ys = got.pop("positions")
    np.testing.assert_array_equal(patients.astype(str), pinned["patient"])
    np.testing.assert_array_equal(xs, pinned["x"])
    np.testing.assert_array_equal(ys, pinned["y"])
    for key, (backend, tta, context) in MODES.items():
        threshold = Predictor(backend=backend, tta=tta, context=context).threshold
        np.testing.assert_allclose(got[key], pinned[key], atol=1e-6, rtol=0, err_msg=key)
        assert np.array_equal(got[key] >= threshold, pinned[key] >= threshold), key


def main(val_folder: str) -> None:
    from histoscreen.data import prepare

    with tempfile.TemporaryDirectory() as temporary:
        prepare(val_folder, Path(temporary) / "store")
        got = shipped_predictions(Path(temporary) / "store")
    patients, xs, ys = got.pop("positions")
    np.savez_compressed(
        PIN, patient=patients.astype(str), x=xs.astype(np.int32), y=ys.astype(np.int32),
        weights_sha256=np.array(weights_digest()), **{k: v.astype(np.float32) for k, v in got.items()},
    )
    print(f"written: {PIN}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        pytest.exit("usage: python tests/test_shipped_pin.py VAL_FOLDER")
    main(sys.argv[1])


def test_every_page_of_figures_names_the_shipped_model_it_was_measured_with():
    """A figure of the shipped model carries the digests of the weights and scoring it was
    measured with: a change of model (or of its scoring) cannot land with the old figures."""
    import re

    from histoscreen.models import shipped_model_path
    from histoscreen.models.bundle import model_digests

    repo = Path(__file__).resolve().parents[1]
    digests = model_digests(shipped_model_path())
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md")), shipped_model_path().parent / "MODEL_CARD.md"]
    stamped = {}
    for page in pages:
        for weights, scoring in re.findall(r"weights sha256 `([0-9a-f]{12})`, scoring sha256 `([0-9a-f]{12})`", page.read_text()):
            stamped[page.name] = (weights, scoring)
            assert (weights, scoring) == (digests["weights"][:12], digests["scoring"][:12]), (
                f"{page}: its figures were measured with another model; measure them again with the shipped one")
    assert {"MODEL_CARD.md", "model.md", "screening.md", "prediction.md", "inference.md"} <= set(stamped)
