"""Writing an evaluation: metrics.json, per_patient.csv and the plots, as one folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from histoscreen.atomic import atomic_folder
from histoscreen.models.bundle import model_paths
from histoscreen.report.plots import write_plots
from histoscreen.tables import write_frame
from histoscreen.tasks.evaluate import Evaluation


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Write the folder `out_dir`; returns the names of the files in it."""
    inputs = [evaluation.measured_on["store"], *model_paths(evaluation.settings["model"])]
    with atomic_folder(Path(out_dir), overwrite=overwrite, inputs=inputs, kind="evaluation") as partial:
        (partial / "metrics.json").write_text(json.dumps(evaluation.report(), indent=2) + "\n")
        write_frame(partial / "per_patient.csv", evaluation.per_patient)
        plots = write_plots(
            evaluation.labels, evaluation.probabilities, evaluation.settings["threshold"], partial,
            title=evaluation.title, history=evaluation.history,
        )
    return ["metrics.json", "per_patient.csv", *plots]
