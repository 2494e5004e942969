"""The standard ResNet-18 (He et al. 2016), as a peer baseline: public IDC work commonly
fine-tunes it on patches upsampled to 224x224. Not meant to be shipped."""

from __future__ import annotations

from torch import nn

from histoscreen.models.blocks import PatchClassifier
from histoscreen.models.registry import register_model
from histoscreen.models.residual import BasicBlock


class ResNet18(PatchClassifier):
    def __init__(self, dropout: float = 0.0):
        stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = [stem]
        previous = 64
        for stage, width in enumerate((64, 128, 256, 512)):
            layers += [BasicBlock(previous, width, stride=1 if stage == 0 else 2), BasicBlock(width, width, stride=1)]
            previous = width
        super().__init__(nn.Sequential(*layers), previous, dropout)


@register_model
def resnet18(dropout: float = 0.0) -> ResNet18:
    return ResNet18(dropout)
