"""FLOPs of a model on one patch, counted from its convolutions and linear layers."""

from __future__ import annotations

import torch
from torch import nn

from histoscreen.constants import PATCH_SIZE


def count_flops(model: nn.Module, size: int = PATCH_SIZE) -> int:
    """Multiply-adds x 2 of one forward pass on a size x size patch (conv and linear layers)."""
    total = 0

    def on_conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2 * kernel * output[0].numel()

    def on_linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * module.in_features * module.out_features

    hooks = [
        m.register_forward_hook(on_conv if isinstance(m, nn.Conv2d) else on_linear)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return total
