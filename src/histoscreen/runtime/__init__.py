"""Runtime stage: running a model on patches (torch or ONNX Runtime) and exporting it."""

from histoscreen.runtime.device import machine_description, pick_device
from histoscreen.runtime.export import EXPORT_FORMATS, export_model
from histoscreen.runtime.forward import batched_logits, batched_view_logits
from histoscreen.runtime.predictor import BACKENDS, Predictor

__all__ = [
    "BACKENDS",
    "EXPORT_FORMATS",
    "Predictor",
    "batched_logits",
    "batched_view_logits",
    "export_model",
    "machine_description",
    "pick_device",
]
