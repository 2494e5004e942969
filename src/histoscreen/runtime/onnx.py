"""ONNX Runtime for fast CPU inference: the model exported once, cached by its weights' hash.

Exporting the model to ONNX takes about a second; doing it on every Predictor made every
short `predict` pay it. The exported graph is cached in the user's cache folder
(HISTOSCREEN_CACHE, else $XDG_CACHE_HOME/histoscreen, else ~/.cache/histoscreen), named
by a hash of the weights file and everything else the graph depends on, so a retrained or
edited model never meets a stale graph. Where no cache folder can be written, the graph is
exported in memory instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from histoscreen.atomic import atomic_write_bytes
from histoscreen.constants import PATCH_SIZE
from histoscreen.data.transforms import Normalisation
from histoscreen.models.bundle import ModelMetadata

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


def cache_folder() -> Path:
    configured = os.environ.get("HISTOSCREEN_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histoscreen"


def cached_onnx_bytes(model: nn.Module, metadata: ModelMetadata, weights: Path, *, refresh: bool = False) -> bytes:
    """onnx_bytes, from the cache when this exact model was exported before (unless `refresh`:
    a cached graph that ONNX Runtime could not load is exported again and replaced)."""
    key = hashlib.sha256(weights.read_bytes())
    key.update(json.dumps([metadata.architecture, metadata.architecture_kwargs, asdict(metadata.normalisation),
                           ONNX_OPSET, torch.__version__]).encode())
    cached = cache_folder() / "onnx" / f"{key.hexdigest()}.onnx"
    if not refresh:
        try:
            return cached.read_bytes()
        except OSError:
            pass
    exported = onnx_bytes(model, metadata)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, exported)
    except OSError:
        pass  # a read-only home: export again next time rather than fail
    return exported


def onnx_runner(model: nn.Module, metadata: ModelMetadata, weights: Path, *, device: torch.device) -> OnnxRunner:
    """A runner from the cached graph; a damaged cache file (a run killed while a disk filled,
    say) is rebuilt instead of failing this run and every later one."""
    try:
        return OnnxRunner(cached_onnx_bytes(model, metadata, weights), device=device)
    except Exception:  # ONNX Runtime's InvalidProtobuf, Fail, ... derive from Exception only
        return OnnxRunner(cached_onnx_bytes(model, metadata, weights, refresh=True), device=device)


class OnnxRunner:
    """An ONNX Runtime session for one model; CUDA when asked for and available, CPU otherwise."""

    def __init__(self, graph: bytes, *, device: torch.device):
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # one budget for torch and ONNX (a Ray actor gets its share)
        self.session = onnxruntime.InferenceSession(graph, options, providers=providers)

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
