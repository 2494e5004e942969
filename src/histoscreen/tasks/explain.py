"""Grad-CAM: which part of a patch drove the model towards IDC (Selvaraju et al. 2017)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histoscreen.constants import PATCH_SIZE
from histoscreen.data.transforms import Normalisation, to_model_input


def last_feature_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional stage: coarse but still spatial, as Grad-CAM needs."""
    features = getattr(model, "features", None)
    if features is None:
        raise ValueError(f"{type(model).__name__} has no 'features' stage for Grad-CAM")
    return features[-1]


def grad_cam(model: torch.nn.Module, patches: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """One map in [0, 1] per patch (N x 50 x 50): where evidence for IDC is."""
    if len(patches) == 0:
        return np.zeros((0, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    device = next(model.parameters()).device
    layer = last_feature_layer(model)
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
