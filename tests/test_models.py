"""The model registry, architectures and the safetensors-only loading."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from histoscreen import HistoscreenError
from histoscreen.models import count_flops, create_model, list_models
from histoscreen.models import load_model
from histoscreen.errors import ModelError
from histoscreen.models.bundle import read_safetensors
from test_cli import histoscreen


@pytest.mark.parametrize("name", ["compact", "residual"])
def test_every_architecture_maps_patches_to_one_logit_each(name):
    assert name in list_models()
    model = create_model(name).eval()
    with torch.no_grad():
        logits = model(torch.rand(5, 3, 50, 50))
    assert logits.shape == (5,)
    assert count_flops(model) > 1e6


def test_flops_of_a_one_layer_pair_by_hand():
    model = create_model("compact", widths=[4], dropout=0.0)
    # stem 3->4 at 50x50, 4->4 stride 2 at 25x25, 4->4 at 25x25, linear 4->1
    expected = 2 * (27 * 4 * 2500 + 36 * 4 * 625 + 36 * 4 * 625 + 4)
    assert count_flops(model) == expected


def test_unknown_architecture_is_named():
    with pytest.raises(HistoscreenError, match="architecture .vgg. is not a known model; available: compact, residual, resnet18"):
        create_model("vgg")


def test_a_pickled_model_is_refused_without_unpickling(tmp_path, tiny_model):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = tmp_path / "model.pt"
    torch.save({"weights": Payload()}, pickled)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(Payload()))
    for path in (pickled, raw):
        with pytest.raises(HistoscreenError, match="pickled PyTorch file.*never unpickles"):
            read_safetensors(path)
    assert not marker.exists()
    pickled.with_suffix(".json").write_text((tiny_model / "model.json").read_text())
    with pytest.raises(HistoscreenError, match="never unpickles"):
        load_model(pickled)
    assert not marker.exists()


def test_missing_or_mismatched_metadata_is_a_clear_error(tmp_path, tiny_model):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes((tiny_model / "model.safetensors").read_bytes())
    with pytest.raises(HistoscreenError, match="metadata m.json is missing"):
        load_model(weights)
    metadata = (tiny_model / "model.json").read_text().replace('"widths": [\n      8,', '"widths": [\n      12,')
    (tmp_path / "m.json").write_text(metadata)
    with pytest.raises(HistoscreenError, match="weights do not fit compact"):
        load_model(weights)


def edit_metadata(tiny_model, tmp_path, edit) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    metadata = json.loads((tiny_model / "model.json").read_text())
    edited = edit(metadata)
    (folder / "model.json").write_text(json.dumps(metadata if edited is None else edited))
    return folder


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["scoring"]["plain"].update(temperature=-1.0), "scoring.plain.temperature must lie between"),
        (lambda m: m["scoring"]["plain"].update(temperature=float("nan")), "temperature must be a finite number"),
        (lambda m: m["scoring"]["context_plain"].update(threshold=2.0), "threshold must lie strictly between 0 and 1"),
        (lambda m: m["scoring"]["tta"].update(threshold=float("nan")), "threshold must be a finite number"),
        (lambda m: m["scoring"]["plain"].update(threshold="0.5"), "threshold must be a finite number, got '0.5'"),
        (lambda m: m["scoring"]["context"].update(radius=0), "radius must be a whole number"),
        (lambda m: m["normalisation"].update(std=[0.2, 0.0, 0.2]), "positive standard deviations"),
        (lambda m: m.pop("normalisation") and None, "missing 'normalisation'"),
        (lambda m: [m], "not histoscreen model metadata"),
        (lambda m: m.update(format_version=99), "newer than this histoscreen reads"),
    ],
)
def test_invalid_metadata_is_refused_with_the_field_named(tiny_model, tmp_path, edit, words):
    folder = edit_metadata(tiny_model, tmp_path, edit)
    with pytest.raises(ModelError, match=re.escape(words)) as caught:
        load_model(folder)
    assert str(folder / "model.json") in str(caught.value) and "\n" not in str(caught.value)


def test_a_negative_temperature_is_refused_by_the_command_line_too(tiny_model, tmp_path, synthetic_store):
    folder = edit_metadata(tiny_model, tmp_path, lambda m: m["scoring"]["plain"].update(temperature=-1.0))
    result = histoscreen("predict", str(synthetic_store), "--model", str(folder), "--out", str(tmp_path / "p.csv"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "temperature must lie between" in result.stderr and not (tmp_path / "p.csv").exists()


def test_wave_1_metadata_still_loads_with_the_same_scoring(tiny_model, tmp_path):
    """Models saved before format 2 kept calibration in flat fields and a context dict."""
    _, current = load_model(tiny_model)
    scoring = current.scoring

    def as_version_1(metadata: dict) -> dict:
        old = {k: metadata[k] for k in ("format", "architecture", "architecture_kwargs", "normalisation", "class_names", "training")}
        for prefix, calibration in (("", scoring.plain), ("tta_", scoring.tta)):
            old.update({f"{prefix}{k}": v for k, v in dataclasses.asdict(calibration).items()})
        old["context"] = {"radius": scoring.context.radius, "weight": scoring.context.weight}
        for prefix, calibration in (("", scoring.context_plain), ("tta_", scoring.context_tta)):
            old["context"].update({f"{prefix}{k}": v for k, v in dataclasses.asdict(calibration).items()})
        old["validation"] = {**metadata["validation"]["metrics"], "threshold_rule": "max balanced accuracy"}
        return old

    folder = edit_metadata(tiny_model, tmp_path, as_version_1)
    _, loaded = load_model(folder)
    assert loaded.scoring == scoring
    assert loaded.validation.metrics == current.validation.metrics
