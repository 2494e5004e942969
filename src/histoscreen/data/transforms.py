"""Batch transforms on patch tensors: normalisation, dihedral views, stain and colour jitter.

Only transforms that suit 50x50 tissue patches: the 8 symmetries of the square (tissue has
no orientation), stain jitter in HED space (labs stain differently) and mild brightness and
contrast. No free rotations, shifts or zooms: on 50-px patches they crop or blur the
nuclei the decision rests on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histoscreen.data.views import DIHEDRAL_VIEWS, Normalisation  # noqa: F401  (re-exported for training)

# Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (as in
# scikit-image's rgb2hed), rows are stains.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_MIN_INTENSITY = 1e-6


def to_model_input(patches: torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W, channels-last in memory."""
    images = patches.permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(images, normalisation)


def normalise(images: torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    mean = torch.tensor(normalisation.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(normalisation.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: `view` % 4 quarter turns, flipped if view >= 4."""
    turned = torch.rot90(images, view % 4, dims=(-2, -1))
    return turned.flip(-1) if view >= 4 else turned


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices of one training batch, drawn before any is applied, so that
    ranks of a distributed run can each apply their share of the same global draw."""

    views: torch.Tensor  # n: which of the 8 dihedral views
    stain_alpha: torch.Tensor | None  # n x 3 x 1 x 1: HED concentration scale
    stain_beta: torch.Tensor | None  # n x 3 x 1 x 1: HED concentration shift
    gain: torch.Tensor | None  # n x 1 x 1 x 1: contrast
    offset: torch.Tensor | None  # n x 1 x 1 x 1: brightness

    @classmethod
    def sample(cls, count: int, generator: torch.Generator, *, stain: float, brightness: float = 0.05, contrast: float = 0.1) -> AugmentationDraw:
        """Per patch: a dihedral view; with `stain` > 0, the HED jitter of Tellez et al. (2019),
        concentration * U(1 - stain, 1 + stain) + U(-stain, stain), and mild brightness and contrast."""
        views = torch.randint(0, DIHEDRAL_VIEWS, (count,), generator=generator)
        if stain <= 0:
            return cls(views, None, None, None, None)
        alpha = 1 + (torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1) * stain
        beta = (torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1) * stain
        gain = 1 + (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1) * contrast
        offset = (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1) * brightness
        return cls(views, alpha, beta, gain, offset)

    def take(self, rows: slice) -> AugmentationDraw:
        return AugmentationDraw(*(None if value is None else value[rows] for value in
                                  (self.views, self.stain_alpha, self.stain_beta, self.gain, self.offset)))


def apply_dihedral(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(images)
    views = views.to(images.device)
    for view in range(DIHEDRAL_VIEWS):
        chosen = views == view
        if chosen.any():
            out[chosen] = dihedral(images[chosen], view)
    return out


def stain_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale and shift each patch's haematoxylin, eosin and DAB concentrations (images in [0, 1])."""
    density = -torch.log(images.clamp_min(_MIN_INTENSITY))
    stains = torch.einsum("nchw,cs->nshw", density, _HED_FROM_RGB.to(images.device))
    stains = stains * alpha.to(images.device) + beta.to(images.device)
    density = torch.einsum("nshw,sc->nchw", stains, _RGB_FROM_HED.to(images.device))
    return torch.exp(-density).clamp_(0, 1)


def brightness_contrast(images: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * gain.to(images.device) + mean + offset.to(images.device)).clamp_(0, 1)


def augment(patches: torch.Tensor, normalisation: Normalisation, draw: AugmentationDraw) -> torch.Tensor:
    """Training view of a uint8 NHWC batch under `draw`: dihedral, stain and colour jitter, normalised."""
    images = patches.permute(0, 3, 1, 2).float().div_(255.0)
    images = apply_dihedral(images, draw.views)
    if draw.stain_alpha is not None:
        images = stain_jitter(images, draw.stain_alpha, draw.stain_beta)
        images = brightness_contrast(images, draw.gain, draw.offset)
    return normalise(images, normalisation).contiguous(memory_format=torch.channels_last)
