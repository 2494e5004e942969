"""What inference needs to know about patches without torch: the normalisation a model was
trained with and the 8 dihedral views of a square patch, on numpy arrays.

The torch versions (data/transforms.py) are for training and the torch backend; the ONNX
path imports only this, so a short `predict` never pays torch's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIHEDRAL_VIEWS = 8


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std of RGB values scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, patches: np.ndarray, sample: int = 20000, seed: int = 0) -> Normalisation:
        """Estimate from up to `sample` patches of an N x H x W x 3 uint8 array."""
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(patches), size=min(sample, len(patches)), replace=False))
        values = patches[chosen].reshape(-1, 3).astype(np.float64) / 255.0
        return cls(tuple(values.mean(0).round(6).tolist()), tuple(values.std(0).round(6).tolist()))


def dihedral_nhwc(patches: np.ndarray, view: int) -> np.ndarray:
    """One of the 8 symmetries of the square on N x H x W x C arrays: `view` % 4 quarter
    turns, flipped if view >= 4 (as transforms.dihedral does on N x C x H x W tensors)."""
    turned = np.rot90(patches, view % 4, axes=(1, 2))
    return turned[:, :, ::-1] if view >= 4 else turned
