"""`predict`: an IDC probability and call for every patch of stores, folders and files.

Returns the rows; writing them is report.write_predictions' job. Each (patient, x, y)
is predicted once, however many copies of it the inputs hold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.data.inputs import SlideReading, open_sources
from histoscreen.data.sources import NO_SLIDE, UNKNOWN_COORDINATE, PatchBatch
from histoscreen.data.wsi import check_pixel_size_setting
from histoscreen.problems import Problem
from histoscreen.progress import Progress, silent
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.ray_engine import RayEngine, RayPool
from histoscreen.tasks.steps import scored_batches

if TYPE_CHECKING:
    import pandas as pd

PREDICTION_COLUMNS = ["path", "patient", "x", "y", "prob_idc", "pred"]


@dataclass
class Predictions:
    """One row per patch: path, patient, x, y (empty where the name gives no place),
    prob_idc and pred (0/1 at the model's threshold)."""

    rows: pd.DataFrame
    settings: dict
    inputs: list[str]
    problems: list[Problem] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0

    @property
    def idc_patches(self) -> int:
        return int(self.rows["pred"].sum())

    def lines(self) -> list[str]:
        rate = len(self.rows) / self.seconds if self.seconds else 0.0
        return [
            f"patches: {len(self.rows):,} predicted, {self.idc_patches:,} called IDC, in {self.seconds:.1f} s ({rate:,.0f} patches/s)",
            f"duplicate copies folded: {self.duplicates:,}",
            f"rejected files: {len(self.problems):,}",
        ]


def predict(
    inputs: Sequence[str | os.PathLike],
    *,
    predictor: Predictor | None = None,
    model: str | os.PathLike | None = None,
    tta: bool = False,
    context: bool | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    mpp: float | None = None,
    engine: RayEngine | None = None,
    progress: Progress = silent,
) -> Predictions:
    """Predict every patch of `inputs` (packed stores, folders searched recursively, PNG
    files, whole-slide images). Files that are not valid patches become problems, never fatal.
    `mpp` is whole-slide images' µm per level-0 pixel, where their metadata lacks it or is wrong.

    Patches are scored batch by batch and their pixels dropped; calls are made once all
    are scored, since with `context` a patch's neighbours may come later. A `predictor`,
    when given, is used as it is (the model options are then ignored). With a Ray `engine`,
    the sources are cut into shards scored by a pool of actors; the rows are the same, in
    the same order.
    """
    started = time.perf_counter()
    if predictor is None:
        predictor = Predictor(model, tta=tta, context=context, device=device, batch_size=batch_size, backend=backend)
    check_pixel_size_setting("mpp", mpp)
    reading = SlideReading(predictor.metadata.spacing_um_px, mpp)
    sources = open_sources(inputs, named_only=False, workers=workers, slides=reading)
    total = sum(len(source) for source in sources)
    scored: list[PatchBatch] = []
    logits: list[np.ndarray] = []
    done = 0
    if engine is None:
        for source in sources:
            for batch_logits, batch in scored_batches(predictor, source):
                logits.append(batch_logits)
                scored.append(batch)
                done += len(batch)
                progress("predicting", done, total)
    else:
        shards = [(source, shard) for source in sources for shard in source.shards(engine.patches_per_shard)]
        with RayPool(engine, predictor) as pool:
            for (source, shard), outcome in zip(shards, pool.map("predict", [(shard,) for _, shard in shards])):
                outcome.absorb_into(source)
                shard_logits, patches = outcome.value
                logits.append(shard_logits)
                scored.append(patches)
                done += shard.patches
                progress("predicting", done, total)
    patches = PatchBatch.concatenate(scored)
    probabilities = predictor.finish(np.concatenate(logits) if logits else np.empty(0), patches.positions)
    known = patches.xs != UNKNOWN_COORDINATE
    import pandas as pd  # where a table is built: screening a slide needs no pandas start-up

    rows = pd.DataFrame(
        {
            "path": patches.paths.astype(str),
            "patient": np.where(patches.patients == NO_SLIDE, "", patches.patients).astype(str),
            "x": pd.Series(patches.xs, dtype="Int64").mask(~known),
            "y": pd.Series(patches.ys, dtype="Int64").mask(~known),
            "prob_idc": probabilities,
            "pred": (probabilities >= predictor.threshold).astype(int),
        },
        columns=PREDICTION_COLUMNS,
    )
    problems = [p for source in sources for p in source.problems + [c.as_problem() for c in source.conflicts]]
    return Predictions(
        rows, predictor.settings(), [str(i) for i in inputs], problems, sum(s.duplicates for s in sources), time.perf_counter() - started
    )
