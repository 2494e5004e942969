"""Writing predictions: the CSV, and beside it OUT.rejects.csv listing the files not used."""

from __future__ import annotations

import os
from pathlib import Path

from histoscreen.atomic import check_output_file
from histoscreen.errors import UnsafeOutputError
from histoscreen.models.bundle import model_paths
from histoscreen.tables import write_csv, write_frame
from histoscreen.tasks.predict import Predictions


REJECTS_HEADER = ["path", "reason"]


def rejects_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".rejects.csv")


def _written_by_histoscreen(rejects: Path) -> bool:
    try:
        with open(rejects, encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip() == ",".join(REJECTS_HEADER)
    except OSError:
        return False


def write_predictions(predictions: Predictions, out_csv: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write the rows to `out_csv` and the problems to OUT.rejects.csv; a rejects file left by
    an earlier run is removed when this run has none, so the pair always belongs together. A
    file of that name that histoscreen did not write is never replaced or removed."""
    out_csv = Path(out_csv)
    inputs = [*predictions.inputs, *model_paths(predictions.settings["model"])]
    rejects = rejects_path(out_csv)
    check_output_file(out_csv, overwrite=overwrite, inputs=inputs)
    check_output_file(rejects, overwrite=True, inputs=inputs)
    if (rejects.exists() or rejects.is_symlink()) and not (rejects.is_file() and not rejects.is_symlink() and _written_by_histoscreen(rejects)):
        raise UnsafeOutputError(
            f"{rejects} exists and is not a rejects list histoscreen wrote; it goes with {out_csv.name}, "
            "so move it away or write the predictions elsewhere"
        )
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = predictions.rows.copy()
    rows["prob_idc"] = rows["prob_idc"].map(lambda p: f"{p:.6f}")
    write_frame(out_csv, rows, replace=overwrite)
    if predictions.problems:
        write_csv(rejects, REJECTS_HEADER, [(p.where, p.reason) for p in predictions.problems])
        return [out_csv, rejects]
    rejects.unlink(missing_ok=True)
    return [out_csv]
