"""Report stage: writers. Tasks compute and return; these turn their results into files
(CSV, JSON, HTML, GeoJSON, PNG), each output written atomically."""

from histoscreen.report.evaluation import write_evaluation
from histoscreen.report.predictions import write_predictions
from histoscreen.report.screening import ScreeningReport, write_screening_report

__all__ = ["ScreeningReport", "write_evaluation", "write_predictions", "write_screening_report"]
