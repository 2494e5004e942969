"""Tasks: predict, evaluate, calibrate and screen. Each computes and returns its results;
none writes a file (the report stage does)."""

from histoscreen.tasks.calibrate import calibrate
from histoscreen.tasks.evaluate import Evaluation, evaluate
from histoscreen.tasks.predict import Predictions, predict
from histoscreen.tasks.ray_engine import RayEngine
from histoscreen.tasks.screen import Screening
from histoscreen.tasks.steps import SlideResult

__all__ = ["Evaluation", "Predictions", "RayEngine", "Screening", "SlideResult", "calibrate", "evaluate", "predict"]
