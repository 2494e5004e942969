"""`evaluate`: a model's figures on the patients of one split of a store, with
patient-bootstrap confidence intervals and a per-patient table.

Returns an Evaluation; report.write_evaluation writes metrics.json, per_patient.csv and
the plots.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.checks import whole_number
from histoscreen.data.sources import PatchBatch, StoreSource
from histoscreen.data.splits import SplitSpec
from histoscreen.data.store import PatchStore
from histoscreen.errors import InputError
from histoscreen.progress import Progress, silent
from histoscreen.runtime.predictor import Predictor
from histoscreen.scoring.metrics import Interval, bootstrap_by_patient, classification_metrics, per_patient_table

if TYPE_CHECKING:
    import pandas as pd

EVALUATION_BATCH = 8192


@dataclass
class Evaluation:
    measured_on: dict  # store, split, patients, patches, IDC patches
    settings: dict  # what decided the calls (Predictor.settings)
    metrics: dict
    intervals: dict[str, Interval]
    bootstrap_rounds: int
    labels: np.ndarray
    probabilities: np.ndarray
    patients: np.ndarray
    per_patient: pd.DataFrame
    history: list[dict] = field(default_factory=list)  # the model's training curves, if it has them
    seconds: float = 0.0

    @property
    def title(self) -> str:
        split = self.measured_on["split"].split("/")[-1]
        return (f"{split} ({self.measured_on['patients']} patients{', dihedral TTA' if self.settings['tta'] else ''}"
                f"{', slide context' if self.settings['context'] else ''})")

    def report(self) -> dict:
        """The metrics.json payload."""
        return {
            "measured_on": self.measured_on,
            **self.settings,
            "metrics": self.metrics,
            "confidence_95": {name: [i.low, i.high] for name, i in self.intervals.items()},
            "bootstrap": f"{self.bootstrap_rounds} resamples of patients with replacement",
        }


def evaluate(
    store_path: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    split: str = "test",
    split_spec: SplitSpec = SplitSpec(),
    tta: bool = False,
    context: bool | None = None,
    bootstrap_rounds: int = 1000,
    device: str = "auto",
    backend: str = "auto",
    progress: Progress = silent,
) -> Evaluation:
    """Metrics, at the model's own threshold, for the patients of one split of a store."""
    started = time.perf_counter()
    whole_number("bootstrap_rounds", bootstrap_rounds)
    store = PatchStore(store_path)
    chosen = split_spec.resolve(store.patient_table())
    source = StoreSource(store, chosen.patients(split))
    if len(source) == 0:
        raise InputError(f"{store.path}: no patches of the {split} patients of the {chosen.name} split")
    predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
    scored, logits, done = [], [], 0
    for batch in source.batches(batch_size=EVALUATION_BATCH):
        logits.append(predictor.patch_logits(batch.pixels))
        scored.append(batch.without_pixels())
        done += len(batch)
        progress("evaluating", done, len(source))
    patches = PatchBatch.concatenate(scored)
    probabilities = predictor.finish(np.concatenate(logits), patches.positions)
    labels, patients, threshold = patches.labels, patches.patients, predictor.threshold
    return Evaluation(
        measured_on={
            "store": str(store.path.resolve()),
            "split": f"{chosen.name}/{split}",
            "patients": len(set(patients)),
            "patches": int(len(labels)),
            "idc_patches": int(labels.sum()),
        },
        settings=predictor.settings(),
        metrics=classification_metrics(labels, probabilities, threshold),
        intervals=bootstrap_by_patient(labels, probabilities, patients, threshold, rounds=bootstrap_rounds),
        bootstrap_rounds=bootstrap_rounds,
        labels=labels,
        probabilities=probabilities,
        patients=patients,
        per_patient=per_patient_table(labels, probabilities, patients, threshold),
        history=predictor.metadata.training.get("history") or [],
        seconds=time.perf_counter() - started,
    )
