"""Report stage: writers. Tasks compute and return; these turn their results into files
(CSV, JSON, HTML, GeoJSON, PNG), each output written atomically."""

from histoscreen.lazy import lazy_exports

_EXPORTS = {
    "write_evaluation": "histoscreen.report.evaluation",  # imports matplotlib: only when asked for
    "write_predictions": "histoscreen.report.predictions",
    "ScreeningReport": "histoscreen.report.screening",
    "write_screening_report": "histoscreen.report.screening",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
