"""The Predictor: a model and the scoring that goes with the chosen mode, run by torch or
ONNX Runtime. The one inference path `predict`, `evaluate`, `screen` (and later the web
app and Ray workers) share."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.checks import choice, whole_number
from histoscreen.constants import PATCH_SIZE
from histoscreen.data.grid import SlidePositions
from histoscreen.data.views import DIHEDRAL_VIEWS
from histoscreen.errors import ArgumentError, ModelError
from histoscreen.models.bundle import (
    ModelMetadata, check_safetensors_file, file_sha256, load_metadata, load_model, model_paths, shipped_model_path,
)
from histoscreen.runtime.device import device_name
from histoscreen.runtime.onnx import onnx_runner
from histoscreen.scoring.calibration import scored
from histoscreen.scoring.context import CONTEXT_FEATURES
from histoscreen.scoring.metrics import sigmoid
from histoscreen.scoring.settings import Calibration, scoring_mode

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "onnx")


def resolve_backend(requested: str, device: str) -> str:
    """'auto' picks ONNX Runtime on the CPU (1.9x torch's speed for the shipped model here)
    and torch on CUDA."""
    choice("backend", requested, BACKENDS)
    if requested == "auto":
        return "onnx" if device == "cpu" else "torch"
    return requested


class Predictor:
    """A loaded model with the calibration and threshold of the chosen mode.

    With `context` (the default when the model has a slide-context calibration), a patch's
    score is blended with its neighbours' on the slide, or given to the model's learned
    context with them (scoring/context.py), and the context
    calibration and threshold apply; that needs every patch of a slide at once, with its
    position. A patch with no neighbours (a sparse slide, a file whose name gives no place)
    keeps its own score, put on the context scale.

    On the ONNX path the torch model is loaded only when something asks for it (Grad-CAM, training, or
    exporting the graph on a cache miss): a short `predict` runs without importing torch.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        tta: bool = False,
        context: bool | None = None,
        device: str = "auto",
        batch_size: int = 256,
        backend: str = "auto",
    ):
        whole_number("batch_size", batch_size)
        self.model_path = Path(model_path) if model_path is not None else shipped_model_path()
        self.device = device_name(device)
        self.backend = resolve_backend(backend, self.device)
        self._model: torch.nn.Module | None = None
        self._model_lock = threading.Lock()
        if self.backend == "torch":
            self._model, self.metadata = self._load_model()
        else:  # the weights are read only if the ONNX graph is not cached; refuse a pickle now all the same
            check_safetensors_file(model_paths(self.model_path)[0])
            self.metadata = load_metadata(self.model_path)
        if context is None:  # the model's best scoring: with context whenever it has one
            context = self.metadata.scoring.has_context
        if context and not self.metadata.scoring.has_context:
            raise ModelError(
                f"{self.model_path}: this model has no slide-context calibration; "
                "fit one on labelled val patients (histoscreen calibrate)"
            )
        linear = self.metadata.scoring.context.linear if self.metadata.scoring.has_context else None
        if linear is not None and len(linear) != len(CONTEXT_FEATURES) + 1:
            raise ModelError(
                f"{self.model_path}: the learned slide context has {len(linear)} weights; this version of histoscreen "
                f"computes {len(CONTEXT_FEATURES)} features and an intercept"
            )
        self.onnx = None
        if self.backend == "onnx":
            self.onnx = onnx_runner(lambda: self.model.cpu(), self.metadata, model_paths(self.model_path)[0], device=self.device)
            if self._model is not None:
                self._model.to(self.device)  # exporting moved it to the CPU
        self.tta = tta
        self.context = context
        self.batch_size = batch_size

    def _load_model(self) -> tuple[torch.nn.Module, ModelMetadata]:
        import torch

        model, metadata = load_model(self.model_path)
        return model.to(self.device, memory_format=torch.channels_last), metadata

    @property
    def model(self) -> torch.nn.Module:
        """The torch model, on the predictor's device, loaded on first use."""
        with self._model_lock:
            if self._model is None:
                self._model, _ = self._load_model()  # the metadata read at start stays the one in use
            return self._model

    @property
    def patch_calibration(self) -> Calibration:
        """Of each patch's own logit (plain or TTA)."""
        return self.metadata.scoring.calibration(scoring_mode(tta=self.tta, context=False))

    @property
    def context_calibration(self) -> Calibration | None:
        """Of the blended logit, with context; None without."""
        return self.metadata.scoring.calibration(scoring_mode(tta=self.tta, context=True)) if self.context else None

    @property
    def threshold(self) -> float:
        """The threshold that goes with `probabilities`: the context one with context."""
        return (self.context_calibration or self.patch_calibration).threshold

    def options(self) -> dict:
        """The arguments that load this predictor again in another process."""
        return {"model_path": str(self.model_path), "tta": self.tta, "context": self.context, "device": str(self.device),
                "batch_size": self.batch_size, "backend": self.backend}

    def settings(self) -> dict:
        """What decides the calls, for reports: the model file and the digest of its weights
        (which model, exactly), the backend, the scoring and its threshold."""
        patch = self.patch_calibration
        weights = model_paths(self.model_path)[0]
        settings = {"model": str(self.model_path), "weights_sha256": file_sha256(weights), "backend": self.backend, "tta": self.tta, "context": self.context,
                    "threshold": self.threshold, "temperature": patch.temperature, "bias": patch.bias}
        if self.context:
            context, calibration = self.metadata.scoring.context, self.context_calibration
            described = {"learned": len(context.linear) - 1} if context.linear else {"radius": context.radius, "weight": context.weight}
            settings["context_settings"] = {**described, "temperature": calibration.temperature, "bias": calibration.bias}
        return settings

    def view_logits(self, patches: np.ndarray) -> np.ndarray:
        """Raw logits, views x N: one view, or the 8 dihedral ones with TTA."""
        _check_patches(patches)
        views = DIHEDRAL_VIEWS if self.tta else 1
        if self.onnx is not None:
            logits = self.onnx.view_logits(patches, views=views, batch_size=self.batch_size)
        else:
            from histoscreen.runtime.forward import batched_view_logits

            logits = batched_view_logits(
                self.model, patches, self.metadata.normalisation, views=views, batch_size=self.batch_size, device=self.device
            )
        return self._finite(logits, "logits")

    def patch_logits(self, patches: np.ndarray) -> np.ndarray:
        """Calibrated logits of each patch on its own."""
        return self.patch_calibration.calibrated(self.view_logits(patches).mean(0))

    def finish(self, patch_logits: np.ndarray, positions: SlidePositions | None = None) -> np.ndarray:
        """Probabilities from calibrated patch logits: sigmoid, or with context, blended with
        the neighbours among the same `positions` (all the patches of the slides at hand)."""
        if not self.context:
            return self._finite(sigmoid(patch_logits), "probabilities")
        if positions is None:
            positions = SlidePositions.unknown(len(patch_logits))
        elif len(positions) != len(patch_logits):
            raise ArgumentError(f"positions has {len(positions)} entries for {len(patch_logits)} patches")
        return self._finite(scored(self.metadata.scoring, patch_logits, positions, tta=self.tta, context=True)[0], "probabilities")

    def _finite(self, values: np.ndarray, what: str) -> np.ndarray:
        """A NaN is no call: never let one through as 'non-IDC'."""
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).reshape(-1, values.shape[-1]).any(0).sum())  # patches, whatever the views
            raise ModelError(f"{self.model_path}: the model computed non-finite {what} (NaN or infinity) for {bad} of "
                             f"{values.shape[-1]} patches; its weights or scoring are broken, no call was made")
        return values

    def probabilities(self, patches: np.ndarray, positions: SlidePositions | None = None) -> np.ndarray:
        """Calibrated IDC probabilities for N x 50 x 50 x 3 uint8 patches."""
        return self.finish(self.patch_logits(patches), positions)

    def patch_logits_with_disagreement(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated patch logits, and which patches' dihedral views fall on both sides of
        the patch threshold (always False without TTA)."""
        views = self.patch_calibration.calibrated(self.view_logits(patches))
        calls = sigmoid(views) >= self.patch_calibration.threshold
        return views.mean(0), calls.any(0) & ~calls.all(0)

    def probabilities_with_disagreement(
        self, patches: np.ndarray, positions: SlidePositions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities, and which patches' views disagree (see above)."""
        logits, disagree = self.patch_logits_with_disagreement(patches)
        return self.finish(logits, positions), disagree


def _check_patches(patches: np.ndarray) -> None:
    shape = (PATCH_SIZE, PATCH_SIZE, 3)
    if not isinstance(patches, np.ndarray) or patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[1:] != shape:
        described = f"{patches.dtype} {patches.shape}" if isinstance(patches, np.ndarray) else type(patches).__name__
        raise ArgumentError(f"patches must be a uint8 array N x {PATCH_SIZE} x {PATCH_SIZE} x 3 (RGB, 0-255), got {described}")
