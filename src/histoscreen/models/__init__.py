"""Models: one file per architecture family, all built through `create_model`, and the
model bundle (weights, metadata and the scoring fitted on val patients)."""

from histoscreen.models import compact, residual, resnet  # noqa: F401  (registers the architectures)
from histoscreen.models.bundle import (
    Calibration,
    ContextSettings,
    ModelMetadata,
    Scoring,
    Validation,
    load_metadata,
    load_model,
    save_model,
    shipped_model_path,
)
from histoscreen.models.flops import count_flops
from histoscreen.models.registry import create_model, list_models, register_model

__all__ = [
    "Calibration",
    "ContextSettings",
    "ModelMetadata",
    "Scoring",
    "Validation",
    "count_flops",
    "create_model",
    "list_models",
    "load_metadata",
    "load_model",
    "register_model",
    "save_model",
    "shipped_model_path",
]
