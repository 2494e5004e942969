"""Other ways to run a model: ONNX Runtime for fast CPU inference, and exports to ONNX and
TorchScript (with a WSInfer config.json, so QuPath's WSInfer extension can use it)."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histoscreen import HistoscreenError
from histoscreen.atomic import atomic_write_bytes, atomic_write_text
from histoscreen.constants import KAGGLE_UM_PER_PX, PATCH_SIZE
from histoscreen.data.transforms import Normalisation
from histoscreen.models.checkpoint import ModelMetadata, load_model

BACKENDS = ("auto", "torch", "onnx")
ONNX_OPSET = 17


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


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxRunner:
    """ONNX Runtime session for one model; CUDA when available, CPU otherwise."""

    def __init__(self, model: nn.Module, metadata: ModelMetadata, *, device: torch.device):
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(onnx_bytes(model, metadata), options, providers=providers)

    def view_logits(self, patches: np.ndarray, *, views: int, batch_size: int) -> np.ndarray:
        """Logits (views x N) under the first `views` dihedral views, as batched_view_logits."""
        outputs = []
        for start in range(0, len(patches), batch_size):
            batch = np.asarray(patches[start : start + batch_size])
            outputs.append(
                np.stack([self.session.run(None, {"patches": np.ascontiguousarray(dihedral_nhwc(batch, v))})[0] for v in range(views)])
            )
        return np.concatenate(outputs, axis=1) if outputs else np.empty((views, 0), dtype=np.float32)


def dihedral_nhwc(patches: np.ndarray, view: int) -> np.ndarray:
    """histoscreen.data.transforms.dihedral for N x H x W x C arrays."""
    turned = np.rot90(patches, view % 4, axes=(1, 2))
    return turned[:, :, ::-1] if view >= 4 else turned


def resolve_backend(requested: str, device: torch.device) -> str:
    """'auto' picks ONNX Runtime on CPU (2.8x torch's speed for the shipped model here) when
    it is installed, torch otherwise."""
    if requested not in BACKENDS:
        raise HistoscreenError(f"unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "onnx" and not onnx_available():
        raise HistoscreenError("--backend onnx needs onnxruntime: pip install onnxruntime")
    if requested == "auto":
        return "onnx" if device.type == "cpu" and onnx_available() else "torch"
    return requested


def export_model(model_path: str | os.PathLike, out: str | os.PathLike, *, format: str, um_per_px: float | None = None) -> list[Path]:
    """Write the model as ONNX (uint8 patches in, logits out, plus its metadata JSON) or as
    TorchScript with a WSInfer config.json beside it. Returns the files written."""
    model, metadata = load_model(model_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, metadata))
        atomic_write_text(out.with_suffix(".json"), metadata.to_json())
        return [out, out.with_suffix(".json")]
    if format != "torchscript":
        raise HistoscreenError(f"unknown export format {format!r}; expected onnx or torchscript")
    wrapped = CalibratedTwoClass(model.eval(), metadata.temperature, metadata.bias).eval()
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
        "spacing_um_px": um_per_px if um_per_px is not None else KAGGLE_UM_PER_PX,
        "transform": [
            {"name": "Resize", "arguments": {"size": PATCH_SIZE}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(metadata.normalisation.mean), "std": list(metadata.normalisation.std)}},
        ],
    }
    config_path = out.parent / "config.json"
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return [out, config_path]
