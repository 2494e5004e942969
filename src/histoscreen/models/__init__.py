"""Models: one file per architecture family, all built through `create_model`, and the
model bundle (weights, metadata and the scoring fitted on val patients, whose settings types
live in the scoring stage: histoscreen.scoring.settings).

Names are imported on first use: reading a model's metadata does not import torch."""

from histoscreen.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ("ModelMetadata", "load_metadata", "load_model", "save_model", "shipped_model_path"),
        "histoscreen.models.bundle",
    ),
    "count_flops": "histoscreen.models.flops",
    **dict.fromkeys(("create_model", "list_models", "register_model"), "histoscreen.models.registry"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
