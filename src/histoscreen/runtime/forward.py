"""The one batched torch forward pass every stage uses: training's validation, calibration,
prediction and screening. uint8 patches in, IDC logits out; and a scoring fitted on them."""

from __future__ import annotations

import numpy as np
import torch

from histoscreen.data.sources import PatchBatch
from histoscreen.data.transforms import DIHEDRAL_VIEWS, Normalisation, dihedral, to_model_input
from histoscreen.scoring.settings import Scoring, Validation
from histoscreen.scoring.calibration import ThresholdRule, fit_scoring


@torch.inference_mode()
def batched_view_logits(
    model: torch.nn.Module,
    patches: np.ndarray | torch.Tensor,
    normalisation: Normalisation,
    *,
    views: int = 1,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> np.ndarray:
    """Logits (views x N) for N x 50 x 50 x 3 uint8 patches under the first `views` dihedral views."""
    device = device or next(model.parameters()).device
    model.eval()
    outputs = []
    for start in range(0, len(patches), batch_size):
        # a copy: store patches are a read-only memory map, which torch will not wrap
        batch = torch.as_tensor(np.array(patches[start : start + batch_size])).to(device, non_blocking=True)
        images = to_model_input(batch, normalisation).contiguous(memory_format=torch.channels_last)
        logits = torch.stack([model(dihedral(images, v)) for v in range(views)]).float()
        outputs.append(logits.cpu().numpy())
    return np.concatenate(outputs, axis=1) if outputs else np.empty((views, 0), dtype=np.float32)


def batched_logits(
    model: torch.nn.Module,
    patches: np.ndarray | torch.Tensor,
    normalisation: Normalisation,
    *,
    tta: bool = False,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> np.ndarray:
    """Logits for N x 50 x 50 x 3 uint8 patches; with `tta`, the mean over the 8 dihedral views."""
    views = DIHEDRAL_VIEWS if tta else 1
    return batched_view_logits(model, patches, normalisation, views=views, batch_size=batch_size, device=device).mean(0)


def plain_and_tta_logits(
    model: torch.nn.Module, normalisation: Normalisation, patches: PatchBatch, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits of one view and the mean of the 8 dihedral views: what a scoring is fitted on."""
    model.to(device or torch.device("cpu"))
    plain = batched_logits(model, patches.pixels, normalisation, device=device)
    return plain, batched_logits(model, patches.pixels, normalisation, tta=True, device=device)


def fit_scoring_on(
    model: torch.nn.Module,
    normalisation: Normalisation,
    val: PatchBatch,
    *,
    rule: ThresholdRule = ThresholdRule(),
    context_model: str = "blend",
    device: torch.device | None = None,
) -> tuple[Scoring, Validation]:
    """Run the model on labelled val patches (one view and the 8 dihedral ones) and fit the
    calibration, thresholds and slide context on them (scoring.calibration.fit_scoring)."""
    plain, tta = plain_and_tta_logits(model, normalisation, val, device)
    return fit_scoring(
        val.labels, plain, tta, positions=val.positions, patients=val.patients, rule=rule, context_model=context_model
    )
