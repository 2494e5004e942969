"""Runtime stage: running a model on patches (torch or ONNX Runtime) and exporting it.

Names are imported on first use: the ONNX path runs without importing torch."""

from histoscreen.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("machine_description", "pick_device"), "histoscreen.runtime.device"),
    **dict.fromkeys(("EXPORT_FORMATS", "export_model"), "histoscreen.runtime.export"),
    **dict.fromkeys(("batched_logits", "batched_view_logits"), "histoscreen.runtime.forward"),
    **dict.fromkeys(("BACKENDS", "Predictor"), "histoscreen.runtime.predictor"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
