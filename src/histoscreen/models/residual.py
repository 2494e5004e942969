"""A residual network for 50x50 patches, deeper than the compact CNN at a similar width."""

from __future__ import annotations

import torch
from torch import nn

from histoscreen.models.blocks import PatchClassifier, conv_bn_relu
from histoscreen.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(inputs, outputs, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResidualNet(PatchClassifier):
    """A full-resolution stem, then stages of basic blocks, each stage halving the resolution."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: tuple[int, ...] = (2, 2, 2), stem: int = 24, dropout: float = 0.2):
        layers: list[nn.Module] = [conv_bn_relu(3, stem)]
        previous = stem
        for width, count in zip(widths, blocks):
            for index in range(count):
                layers.append(BasicBlock(previous, width, stride=2 if index == 0 else 1))
                previous = width
        super().__init__(nn.Sequential(*layers), previous, dropout)


@register_model
def residual(
    widths: tuple[int, ...] | list[int] = (32, 64, 128),
    blocks: tuple[int, ...] | list[int] = (2, 2, 2),
    stem: int = 24,
    dropout: float = 0.2,
) -> ResidualNet:
    return ResidualNet(tuple(widths), tuple(blocks), stem, dropout)
