"""`calibrate`: refit a model's scoring (calibration, thresholds, slide context) on the val
patients of a store, weights unchanged. Returns the model and its new metadata; saving
them is the caller's choice.

With the split scheme "all" every patient of the store is a calibration patient: a lab's
own reviewed slides. Then the result carries an estimate of what the refit is worth there,
before anyone relies on it: the figures on those patients of the model it started from,
and of the refit with each patient called by a fit on all the others (what a patient it
was not fitted on will see). benchmarks/lab_adaptation.py found such refits on 4 to 16
patients of a new population no better on its other patients; the estimate says so per lab.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.data.naming import patient_sort_key
from histoscreen.data.inputs import SlideReading, open_sources
from histoscreen.data.sources import NO_LABEL, PatchBatch, StoreSource
from histoscreen.data.splits import SplitSpec
from histoscreen.data.store import PatchStore
from histoscreen.errors import InputError
from histoscreen.models.bundle import ModelMetadata, load_model
from histoscreen.scoring.settings import Scoring
from histoscreen.runtime.device import pick_device
from histoscreen.scoring.calibration import ThresholdRule, refitted_per_patient, scored
from histoscreen.scoring.metrics import confusion_counts
from histoscreen.scoring.slides import complete_slides, slide_burdens, slide_figures
from histoscreen.tasks.steps import read_truth, with_truth

if TYPE_CHECKING:
    import torch

# Fewer patients or patches of a class than this make a refit whose estimate means nothing.
MIN_LAB_PATIENTS = 5
MIN_LAB_PATCHES_PER_CLASS = 50


def calibrate(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    model_path: str | os.PathLike,
    *,
    split_spec: SplitSpec = SplitSpec(),
    rule: ThresholdRule = ThresholdRule(),
    context_model: str = "blend",
    device: str = "auto",
    labels: Sequence[str | os.PathLike] = (),
    mpp: float | None = None,
) -> tuple[torch.nn.Module, ModelMetadata]:
    """`inputs`: one store, whose split's val patients calibrate; or, with the split scheme
    "all", any inputs `screen` takes (stores, patch folders, whole-slide images), every
    labelled patch of them calibrating, its label from `labels` (CSV or SLIDE.geojson
    annotations, as `screen --labels`) or else from the names."""
    from histoscreen.runtime.forward import plain_and_tta_logits  # torch, imported only where it runs
    from histoscreen.scoring.calibration import fit_scoring

    model, metadata = load_model(model_path)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    lab = split_spec.scheme == "all"
    if lab:
        where, split_name = ", ".join(str(i) for i in inputs), "all"
        val = labelled_patches(inputs, labels=labels, spacing=metadata.spacing_um_px, mpp=mpp)
        check_lab_patients(where, val)
        store_path = None
    else:
        if len(inputs) != 1 or labels:
            raise InputError(f"{', '.join(map(str, inputs))}: calibrating on a split's val patients takes one store and the "
                             "labels in it; the split scheme 'all' takes several inputs and label files")
        store = PatchStore(inputs[0])
        split = split_spec.resolve(store.patient_table())
        val = StoreSource(store, split.val).read_all()
        where, split_name, store_path = store.path, split.name, str(store.path.resolve())
        if len(val) == 0:
            raise InputError(f"{store.path}: no patches of the val patients of the {split.name} split")
    if val.labels.all() or not val.labels.any():
        raise InputError(f"{where}: the calibration patients hold only one class; calibration needs both")
    plain, tta = plain_and_tta_logits(model, metadata.normalisation, val, pick_device(device))
    scoring, validation = fit_scoring(
        val.labels, plain, tta, positions=val.positions, patients=val.patients, rule=rule, context_model=context_model
    )
    estimate = lab_estimate(metadata.scoring, val, plain, rule, context_model) if lab else None
    patients = tuple(sorted(set(val.patients.tolist()), key=patient_sort_key))
    metadata.scoring = scoring
    metadata.validation = replace(validation, split=f"{split_name}/val", patients=patients, store=store_path, estimate=estimate)
    return model.cpu(), metadata


def labelled_patches(
    inputs: Sequence[str | os.PathLike], *, labels: Sequence[str | os.PathLike], spacing: float, mpp: float | None
) -> PatchBatch:
    """Every patch of the inputs that has a label (from the label files, else the names), with its pixels."""
    sources = open_sources(inputs, named_only=True, slides=SlideReading(spacing, mpp))
    slides = [(source, slide) for source in sources for slide in source.slide_ids()]
    truth = read_truth(labels, slides) if labels else None
    parts = []
    for source in sources:
        for batch in source.batches():
            batch.labels = with_truth(batch, truth)
            parts.append(batch.take(batch.labels != NO_LABEL))
    problems = [p for source in sources for p in source.problems]
    if problems and not any(len(part) for part in parts):
        raise InputError(f"nothing to calibrate on: {problems[0].where}: {problems[0].reason}")
    return PatchBatch.concatenate(parts) if parts else PatchBatch.empty()


def check_lab_patients(where: str | os.PathLike, patches: PatchBatch) -> None:
    patients = len(set(patches.patients.tolist()))
    idc = int(patches.labels.sum())
    if patients < MIN_LAB_PATIENTS:
        raise InputError(f"{where}: {patients} patients; calibrating on a lab's own needs at least {MIN_LAB_PATIENTS}, "
                         "or the fit follows those few slides and its estimate says nothing")
    for name, label, count in (("IDC", 1, idc), ("non-IDC", 0, len(patches) - idc)):
        if count < MIN_LAB_PATCHES_PER_CLASS:
            raise InputError(f"{where}: {count} {name} patches; calibrating needs at least {MIN_LAB_PATCHES_PER_CLASS} of each class")
        if len(set(patches.patients[patches.labels == label].tolist())) < 2:
            raise InputError(f"{where}: every {name} patch is one patient's; leaving that patient out would leave none to fit on")


def call_figures(labels: np.ndarray, calls: np.ndarray, patients: np.ndarray, complete: dict[str, bool]) -> dict:
    """Sensitivity, specificity, balanced accuracy of calls, and the IDC slides under-called
    among the complete slides (scoring/slides.py)."""
    tn, fp, fn, tp = confusion_counts(labels, calls)
    sensitivity, specificity = tp / max(1, tp + fn), tn / max(1, tn + fp)
    burdens = slide_burdens(patients, labels, calls, only={slide for slide, whole in complete.items() if whole})
    return {"sensitivity": sensitivity, "specificity": specificity, "balanced_accuracy": (sensitivity + specificity) / 2,
            "under_called": slide_figures(burdens).get("under_called", []), "complete_slides": len(burdens)}


def lab_estimate(before: Scoring, patches: PatchBatch, plain_logits: np.ndarray, rule: ThresholdRule, context_model: str) -> dict:
    """The model's figures on these patients as it came, and the refit's by leaving one
    patient out (each called by a scoring fitted on the others), one view, slide context
    where the scoring has one."""
    labels, patients, positions = patches.labels.astype(int), patches.patients.astype(str), patches.positions
    complete = complete_slides(positions, labels)
    probabilities, threshold = scored(before, before.plain.calibrated(plain_logits), positions, tta=False, context=before.has_context)
    after = refitted_per_patient(labels, plain_logits, positions, patients, rule=rule, context_model=context_model)
    return {"patients": int(len(np.unique(patients))), "method": "leave one patient out: each patient called by a refit on the others",
            "before": call_figures(labels, probabilities >= threshold, patients, complete),
            "after": call_figures(labels, after, patients, complete)}
