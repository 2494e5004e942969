"""The model registry: every architecture registers a factory; `create_model` is the way in."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from histoscreen.errors import SettingError

if TYPE_CHECKING:
    from torch import nn

# The architectures that ship, imported (and so registered) when first asked for: importing
# them imports torch, which a command that only reads a model's metadata never needs.
_BUILTIN_MODULES = ("histoscreen.models.compact", "histoscreen.models.residual", "histoscreen.models.resnet")

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `factory` under its function name (underscores read as dashes)."""
    _FACTORIES[factory.__name__.replace("_", "-")] = factory
    return factory


# What architecture_kwargs (from a model file or --arch-kwargs) may ask for, checked before
# anything is built: widths of 200,000 or 10^9 blocks would take memory until the machine gives out.
SIZE_LIMITS = {"widths": (1, 1024), "blocks": (1, 16), "stem": (1, 512)}
MAX_STAGES = 8
MAX_PARAMETERS = 50_000_000


def check_architecture_kwargs(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise SettingError("architecture_kwargs", f"dropout must lie in [0, 1), got {value!r}")
        elif key in SIZE_LIMITS:
            low, high = SIZE_LIMITS[key]
            values = value if isinstance(value, (list, tuple)) else [value]
            if len(values) > MAX_STAGES or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values):
                raise SettingError("architecture_kwargs", f"{key} must be whole numbers from {low} to {high} (at most {MAX_STAGES}), got {value!r}")
    widths, blocks = kwargs.get("widths", ()), kwargs.get("blocks", ())
    if isinstance(widths, (list, tuple)) and isinstance(blocks, (list, tuple)):
        estimate = sum(18 * w * w * b for w, b in zip(widths, blocks))  # two 3x3 convolutions a block
        if estimate > MAX_PARAMETERS:
            raise SettingError("architecture_kwargs", f"widths {list(widths)} and blocks {list(blocks)} make about "
                               f"{estimate:,} parameters; at most {MAX_PARAMETERS:,}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture. Every model maps N x 3 x 50 x 50 to N IDC logits."""
    _register_builtins()
    if name not in _FACTORIES:
        raise SettingError("architecture", f"{name!r} is not a known model; available: {', '.join(list_models())}")
    check_architecture_kwargs(kwargs)
    return _FACTORIES[name](**kwargs)


def list_models() -> list[str]:
    _register_builtins()
    return sorted(_FACTORIES)


def _register_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
