"""The model registry: every architecture registers a factory; `create_model` is the way in."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from histoscreen.errors import SettingError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `factory` under its function name (underscores read as dashes)."""
    _FACTORIES[factory.__name__.replace("_", "-")] = factory
    return factory


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture. Every model maps N x 3 x 50 x 50 to N IDC logits."""
    if name not in _FACTORIES:
        raise SettingError("architecture", f"{name!r} is not a known model; available: {', '.join(list_models())}")
    return _FACTORIES[name](**kwargs)


def list_models() -> list[str]:
    return sorted(_FACTORIES)
