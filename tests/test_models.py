"""The model registry, architectures and the safetensors-only loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from histoscreen import HistoscreenError
from histoscreen.models import count_flops, create_model, list_models
from histoscreen.models import load_model
from histoscreen.models.bundle import read_safetensors


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
