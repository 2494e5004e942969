"""Exports: ONNX (uint8 patches in, logits out) and TorchScript with a WSInfer config.json,
so QuPath's WSInfer extension can run the model."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from histoscreen.checks import choice
from histoscreen.atomic import atomic_write_bytes, atomic_write_text, check_output_file
from histoscreen.constants import ONNX_OPSET, PATCH_SIZE
from histoscreen.data.wsi import check_pixel_size_setting
from histoscreen.models.bundle import load_model, model_paths
from histoscreen.data.views import Normalisation
from histoscreen.models.bundle import ModelMetadata

EXPORT_FORMATS = ("onnx", "torchscript")


class UInt8Model(nn.Module):
    """uint8 N x 50 x 50 x 3 patches in, IDC logits out: normalisation inside the graph, so an
    exported model needs nothing but the patches."""

    def __init__(self, model: nn.Module, normalisation: Normalisation):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(normalisation.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(normalisation.std).view(1, 3, 1, 1) * 255)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        images = (patches.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.model(images)


def onnx_bytes(model: nn.Module, metadata: ModelMetadata) -> bytes:
    """The model as ONNX, taking uint8 patches (N x 50 x 50 x 3) and giving logits (N)."""
    wrapped = UInt8Model(model.cpu().eval(), metadata.normalisation).eval()
    example = torch.zeros(2, PATCH_SIZE, PATCH_SIZE, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no extra packages, and
        # these models are plain feed-forward graphs it handles exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["patches"], output_names=["logits"],
            dynamic_axes={"patches": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


class CalibratedTwoClass(nn.Module):
    """Normalised float N x 3 x H x W in, two logits out, [0, logit / T + b]: a softmax of
    them gives the calibrated (non-IDC, IDC) probabilities, as WSInfer expects."""

    def __init__(self, model: nn.Module, temperature: float, bias: float):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.bias = bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit = self.model(images) / self.temperature + self.bias
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def export_model(
    model_path: str | os.PathLike, out: str | os.PathLike, *, format: str, mpp: float | None = None, overwrite: bool = False
) -> list[Path]:
    """Write the model as ONNX (uint8 patches in, logits out, plus its metadata JSON) or as
    TorchScript with a WSInfer config.json beside it. Returns the files written."""
    choice("format", format, EXPORT_FORMATS)
    check_pixel_size_setting("mpp", mpp)
    model, metadata = load_model(model_path)
    out = Path(out)
    for written in (out, out.with_suffix(".json") if format == "onnx" else out.parent / "config.json"):
        check_output_file(written, overwrite=overwrite, inputs=model_paths(model_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, metadata))
        atomic_write_text(out.with_suffix(".json"), metadata.to_json())
        return [out, out.with_suffix(".json")]
    plain = metadata.scoring.plain
    wrapped = CalibratedTwoClass(model.eval(), plain.temperature, plain.bias).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch, but it is the format WSInfer and QuPath load.
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(wrapped, torch.zeros(1, 3, PATCH_SIZE, PATCH_SIZE))
        torch.jit.save(scripted, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    config = {
        "spec_version": "1.0",
        "architecture": f"histoscreen-{metadata.architecture}",
        "num_classes": 2,
        "class_names": list(metadata.class_names),
        "patch_size_pixels": PATCH_SIZE,
        "spacing_um_px": mpp if mpp is not None else metadata.spacing_um_px,
        "transform": [
            {"name": "Resize", "arguments": {"size": PATCH_SIZE}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(metadata.normalisation.mean), "std": list(metadata.normalisation.std)}},
        ],
    }
    config_path = out.parent / "config.json"
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return [out, config_path]
