"""Writing predictions: the CSV, and beside it OUT.rejects.csv listing the files not used."""

from __future__ import annotations

import os
from pathlib import Path

from histoscreen.atomic import check_output_file
from histoscreen.models.bundle import model_paths
from histoscreen.tables import write_csv, write_frame
from histoscreen.tasks.predict import Predictions


def rejects_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".rejects.csv")


def write_predictions(predictions: Predictions, out_csv: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write the rows to `out_csv` and the problems to OUT.rejects.csv; a rejects file left by
    an earlier run is removed when this run has none, so the pair always belongs together."""
    out_csv = Path(out_csv)
    inputs = [*predictions.inputs, *model_paths(predictions.settings["model"])]
    check_output_file(out_csv, overwrite=overwrite, inputs=inputs)
    check_output_file(rejects_path(out_csv), overwrite=True, inputs=inputs)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = predictions.rows.copy()
    rows["prob_idc"] = rows["prob_idc"].map(lambda p: f"{p:.6f}")
    write_frame(out_csv, rows)
    rejects = rejects_path(out_csv)
    if predictions.problems:
        write_csv(rejects, ["path", "reason"], [(p.where, p.reason) for p in predictions.problems])
        return [out_csv, rejects]
    rejects.unlink(missing_ok=True)
    return [out_csv]
