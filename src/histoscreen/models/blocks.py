"""Pieces every architecture shares: a convolution unit and the classifier around features."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class PatchClassifier(nn.Module):
    """`features` (a spatial stage, which Grad-CAM hooks into), then global average pooling,
    dropout and one IDC logit per patch."""

    def __init__(self, features: nn.Sequential, width: int, dropout: float):
        super().__init__()
        self.features = features
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)
