"""Models: one file per architecture family, all built through `create_model`."""

from histoscreen.models import compact, residual, resnet  # noqa: F401  (registers the architectures)
from histoscreen.models.registry import create_model, list_models, register_model
from histoscreen.models.flops import count_flops

__all__ = ["count_flops", "create_model", "list_models", "register_model"]
