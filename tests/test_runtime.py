"""ONNX and TorchScript exports agree with torch; the ONNX backend predicts what torch predicts."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file, save_file

from histoscreen.runtime import Predictor, export_model
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
    written = export_model(shipped_model_path(), tmp_path / "wsinfer" / "torchscript_model.pt", format="torchscript", mpp=4.0)
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


def test_predictor_refuses_patches_that_are_not_uint8_rgb(tiny_model):
    from histoscreen.errors import ArgumentError

    predictor = Predictor(tiny_model, backend="torch")
    with pytest.raises(ArgumentError, match="uint8 array N x 50 x 50 x 3"):
        predictor.probabilities(np.random.default_rng(0).random((4, 50, 50, 3)))  # floats in [0, 1]
    with pytest.raises(ArgumentError, match=r"uint8 \(4, 3, 50, 50\)"):
        predictor.probabilities(np.zeros((4, 3, 50, 50), dtype=np.uint8))  # channels first


def test_the_onnx_graph_is_exported_once_and_cached_by_the_weights(tiny_model, synthetic_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSCREEN_CACHE", str(tmp_path / "cache"))
    patches = np.asarray(PatchStore(synthetic_store).patches[:200])
    first = Predictor(tiny_model, backend="onnx")
    [cached] = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    stamp = cached.stat().st_mtime_ns
    second = Predictor(tiny_model, backend="onnx")
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")) == [cached] and cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.probabilities(patches), second.probabilities(patches))

    # other weights, another graph: an edited model never meets a stale one
    changed = tmp_path / "changed"
    changed.mkdir()
    tensors = load_file(tiny_model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, changed / "model.safetensors")
    (changed / "model.json").write_text((tiny_model / "model.json").read_text())
    third = Predictor(changed, backend="onnx")
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2
    assert not np.allclose(third.probabilities(patches), first.probabilities(patches))


def test_an_unwritable_cache_falls_back_to_exporting_in_memory(tiny_model, synthetic_store, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("HISTOSCREEN_CACHE", str(blocked))
    patches = np.asarray(PatchStore(synthetic_store).patches[:50])
    on_onnx = Predictor(tiny_model, backend="onnx").probabilities(patches)
    on_torch = Predictor(tiny_model, backend="torch").probabilities(patches)
    assert np.abs(on_onnx - on_torch).max() < 1e-4


def test_plots_touch_no_global_matplotlib_state(tiny_model, synthetic_store, tmp_path):
    """Writing an evaluation must not pick a backend or import pyplot (web servers and
    notebooks own those)."""
    script = f"""
import sys, matplotlib
before = dict.__getitem__(matplotlib.rcParams, "backend")  # the raw setting: get_backend() would resolve it
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import evaluate_to
from histoscreen.data import SplitSpec
evaluate_to({str(synthetic_store)!r}, {str(tmp_path / "eval")!r}, model={str(tiny_model)!r}, split="val",
            split_spec=SplitSpec("kfold", folds=3, fold=1), bootstrap_rounds=5)
assert "matplotlib.pyplot" not in sys.modules
assert dict.__getitem__(matplotlib.rcParams, "backend") == before
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000
