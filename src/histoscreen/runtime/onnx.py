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
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime

from histoscreen.atomic import atomic_write_bytes
from histoscreen.constants import ONNX_OPSET
from histoscreen.data.views import dihedral_nhwc
from histoscreen.models.bundle import ModelMetadata
from histoscreen.runtime.device import thread_budget

if TYPE_CHECKING:
    from torch import nn



def cache_folder() -> Path:
    configured = os.environ.get("HISTOSCREEN_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histoscreen"


def cached_onnx_bytes(
    load: Callable[[], nn.Module], metadata: ModelMetadata, weights: Path, *, refresh: bool = False
) -> bytes:
    """export.onnx_bytes of the model `load` gives, from the cache when this exact model was
    exported before (unless `refresh`: a cached graph that ONNX Runtime could not load is
    exported again and replaced). Only a cache miss loads the model, and so imports torch."""
    key = hashlib.sha256(weights.read_bytes())
    key.update(json.dumps([metadata.architecture, metadata.architecture_kwargs, asdict(metadata.normalisation),
                           ONNX_OPSET, package_metadata.version("torch")]).encode())
    cached = cache_folder() / "onnx" / f"{key.hexdigest()}.onnx"
    if not refresh:
        try:
            return cached.read_bytes()
        except OSError:
            pass
    from histoscreen.runtime.export import onnx_bytes

    exported = onnx_bytes(load(), metadata)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, exported)
    except OSError:
        pass  # a read-only home: export again next time rather than fail
    return exported


def onnx_runner(load: Callable[[], nn.Module], metadata: ModelMetadata, weights: Path, *, device: str) -> OnnxRunner:
    """A runner from the cached graph; a damaged cache file (a run killed while a disk filled,
    say) is rebuilt instead of failing this run and every later one."""
    try:
        return OnnxRunner(cached_onnx_bytes(load, metadata, weights), device=device)
    except Exception:  # ONNX Runtime's InvalidProtobuf, Fail, ... derive from Exception only
        return OnnxRunner(cached_onnx_bytes(load, metadata, weights, refresh=True), device=device)


class OnnxRunner:
    """An ONNX Runtime session for one model; CUDA when asked for and available, CPU otherwise."""

    def __init__(self, graph: bytes, *, device: str):
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = thread_budget()  # one budget for torch and ONNX (a Ray actor gets its share)
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
