"""ONNX and TorchScript exports agree with torch; the ONNX backend predicts what torch predicts."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import onnxruntime
import pytest
import torch

from histoscreen.runtime import export_model
from histoscreen.data import PatchStore
from histoscreen.data.transforms import to_model_input
from histoscreen.scoring import sigmoid
from histoscreen.models import shipped_model_path
from conftest import predict_to_csv
from histoscreen.models import load_model
from histoscreen.runtime import batched_logits


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_onnx_export_round_trip(which, tiny_model, synthetic_store, tmp_path):
    source = shipped_model_path() if which == "shipped" else tiny_model
    export_model(source, tmp_path / "model.onnx", format="onnx")
    patches = np.asarray(PatchStore(synthetic_store).patches[:300])
    model, metadata = load_model(source)
    expected = batched_logits(model, patches, metadata.normalisation)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"patches": patches})[0]
    assert np.abs(sigmoid(got) - sigmoid(expected)).max() < 1e-4
    assert np.abs(got - expected).max() < 1e-3
    assert json.loads((tmp_path / "model.json").read_text())["scoring"]["plain"] == dataclasses.asdict(metadata.scoring.plain)


def test_torchscript_export_round_trip_with_wsinfer_config(synthetic_store, tmp_path):
    written = export_model(shipped_model_path(), tmp_path / "wsinfer" / "torchscript_model.pt", format="torchscript", um_per_px=4.0)
    assert [p.name for p in written] == ["torchscript_model.pt", "config.json"]
    config = json.loads((tmp_path / "wsinfer" / "config.json").read_text())
    model, metadata = load_model(shipped_model_path())
    assert config["spec_version"] == "1.0" and config["num_classes"] == 2
    assert config["patch_size_pixels"] == 50 and config["spacing_um_px"] == 4.0
    assert config["class_names"] == ["non-IDC", "IDC"]
    normalise = next(t for t in config["transform"] if t["name"] == "Normalize")["arguments"]
    assert normalise["mean"] == list(metadata.normalisation.mean) and normalise["std"] == list(metadata.normalisation.std)

    patches = np.asarray(PatchStore(synthetic_store).patches[:300])
    scripted = torch.jit.load(str(tmp_path / "wsinfer" / "torchscript_model.pt"))
    with torch.no_grad():
        two_class = scripted(to_model_input(torch.from_numpy(patches.copy()), metadata.normalisation))
    probabilities = torch.softmax(two_class, dim=1)[:, 1].numpy()
    expected = sigmoid(metadata.scoring.plain.calibrated(batched_logits(model, patches, metadata.normalisation)))
    assert np.abs(probabilities - expected).max() < 1e-4


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_backend_gives_the_same_predictions_as_torch(tta, tmp_path):
    from histoscreen.data import synthesize

    synthesize(tmp_path / "slides", patients=2, seed=31)
    predict_to_csv([tmp_path / "slides"], tmp_path / "torch.csv", tta=tta, backend="torch")
    predict_to_csv([tmp_path / "slides"], tmp_path / "onnx.csv", tta=tta, backend="onnx")
    torch_rows, onnx_rows = read_rows(tmp_path / "torch.csv"), read_rows(tmp_path / "onnx.csv")
    assert [r["path"] for r in torch_rows] == [r["path"] for r in onnx_rows] and len(torch_rows) > 100
    assert [r["pred"] for r in torch_rows] == [r["pred"] for r in onnx_rows]
    difference = max(abs(float(a["prob_idc"]) - float(b["prob_idc"])) for a, b in zip(torch_rows, onnx_rows))
    assert difference < 1e-4
