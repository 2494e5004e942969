"""Explanations: which part of a patch drove the model towards IDC.

Two methods. Occlusion sensitivity (Zeiler & Fergus 2014), the one reports use: each 10 x 10
px square of the patch, stride 5, is painted over with the training set's mean colour, and
the fall of the IDC logit it causes is that square's evidence; a pixel's is the mean over
the squares covering it. It needs only the model's scores (ONNX Runtime runs it, 82 views a
patch) and sees the whole patch alike. Grad-CAM (Selvaraju et al. 2017) is kept for
comparison: on these 50-px patches its last stage is 7 x 7 cells, zero-padded, and its maps
light the border ring and leave the tumour cells dark (benchmarks/explanations.py measures
both: border energy, the model-randomisation check of Adebayo et al. 2018, and a deletion
test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.constants import PATCH_SIZE
from histoscreen.data.views import Normalisation
from histoscreen.runtime.predictor import Predictor

if TYPE_CHECKING:
    import torch

OCCLUSION_WINDOW = 10
OCCLUSION_STRIDE = 5


def occlusion_windows(size: int = PATCH_SIZE, window: int = OCCLUSION_WINDOW, stride: int = OCCLUSION_STRIDE) -> list[int]:
    """Top-left offsets along one side; the last window ends at the edge."""
    return list(range(0, size - window + 1, stride))


def occlusion_maps(
    logits: Callable[[np.ndarray], np.ndarray], patches: np.ndarray, normalisation: Normalisation,
    *, window: int = OCCLUSION_WINDOW, stride: int = OCCLUSION_STRIDE,
) -> np.ndarray:
    """One map in [0, 1] per patch (N x 50 x 50): how much the IDC logit falls when each part
    of the patch is hidden. `logits` scores uint8 N x 50 x 50 x 3 patches (any monotone scale)."""
    count = len(patches)
    if count == 0:
        return np.zeros((0, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    fill = np.round(np.asarray(normalisation.mean) * 255).astype(np.uint8)
    offsets = [(top, left) for top in occlusion_windows(PATCH_SIZE, window, stride) for left in occlusion_windows(PATCH_SIZE, window, stride)]
    views = np.repeat(np.asarray(patches)[:, None], len(offsets) + 1, axis=1)  # N x (1 + windows) x 50 x 50 x 3
    for index, (top, left) in enumerate(offsets, start=1):
        views[:, index, top : top + window, left : left + window] = fill
    scores = np.asarray(logits(views.reshape(-1, PATCH_SIZE, PATCH_SIZE, 3)), dtype=np.float64).reshape(count, len(offsets) + 1)
    drops = scores[:, :1] - scores[:, 1:]  # positive: hiding the square lowered the IDC score
    evidence = np.zeros((count, PATCH_SIZE, PATCH_SIZE))
    covered = np.zeros((PATCH_SIZE, PATCH_SIZE))
    for index, (top, left) in enumerate(offsets):
        evidence[:, top : top + window, left : left + window] += drops[:, index, None, None]
        covered[top : top + window, left : left + window] += 1
    maps = np.clip(evidence / covered, 0, None)
    peak = np.maximum(maps.reshape(count, -1).max(axis=1), 1e-8)[:, None, None]
    return (maps / peak).astype(np.float32)


def explanation_maps(predictor: Predictor, patches: np.ndarray) -> np.ndarray:
    """The maps reports and the web app show: occlusion sensitivity of the predictor's own
    calibrated patch score (with TTA when it scores with TTA), on its own backend."""
    return occlusion_maps(predictor.patch_logits, patches, predictor.metadata.normalisation)


def last_feature_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional stage: coarse but still spatial, as Grad-CAM needs."""
    features = getattr(model, "features", None)
    if features is None:
        raise ValueError(f"{type(model).__name__} has no 'features' stage for Grad-CAM")
    return features[-1]


def grad_cam(model: torch.nn.Module, patches: np.ndarray, normalisation: Normalisation, layer: torch.nn.Module | None = None) -> np.ndarray:
    """One map in [0, 1] per patch (N x 50 x 50): where evidence for IDC is, by Grad-CAM at
    `layer` (default: the last feature stage)."""
    import torch
    import torch.nn.functional as F

    from histoscreen.data.transforms import to_model_input

    if len(patches) == 0:
        return np.zeros((0, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    device = next(model.parameters()).device
    layer = layer if layer is not None else last_feature_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activations"] = output

    hook = layer.register_forward_hook(keep)
    try:
        model.eval()
        images = to_model_input(torch.as_tensor(np.array(patches)).to(device), normalisation)
        with torch.enable_grad():
            logits = model(images)
            logits.sum().backward()
    finally:
        hook.remove()
    activations = captured["activations"]
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cams = F.interpolate(cams, size=(PATCH_SIZE, PATCH_SIZE), mode="bilinear", align_corners=False)[:, 0]
    peak = cams.flatten(1).max(dim=1).values.clamp_min(1e-8).view(-1, 1, 1)
    model.zero_grad(set_to_none=True)
    return (cams / peak).detach().cpu().numpy()
