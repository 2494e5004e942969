"""A compact plain CNN for 50x50 patches: few FLOPs, so CPU screening is fast."""

from __future__ import annotations

from torch import nn

from histoscreen.models.blocks import PatchClassifier, conv_bn_relu
from histoscreen.models.registry import register_model


class CompactNet(PatchClassifier):
    """Pairs of 3x3 convolutions, each pair halving the resolution: 50 -> 25 -> 13 -> 7 -> 4.

    The first convolution keeps full resolution: IDC is told apart by the size, crowding
    and shape of nuclei only a few pixels wide at this magnification.
    """

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 96), dropout: float = 0.2):
        layers = [conv_bn_relu(3, widths[0])]
        previous = widths[0]
        for width in widths:
            layers += [conv_bn_relu(previous, width, stride=2), conv_bn_relu(width, width)]
            previous = width
        super().__init__(nn.Sequential(*layers), previous, dropout)


@register_model
def compact(widths: tuple[int, ...] | list[int] = (24, 32, 64, 96), dropout: float = 0.2) -> CompactNet:
    return CompactNet(tuple(widths), dropout)
