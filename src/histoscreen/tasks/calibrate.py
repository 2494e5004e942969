"""`calibrate`: refit a model's scoring (calibration, thresholds, slide context) on the val
patients of a store, weights unchanged. Returns the model and its new metadata; saving
them is the caller's choice."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from histoscreen.data.naming import patient_sort_key
from histoscreen.data.sources import StoreSource
from histoscreen.data.splits import SplitSpec
from histoscreen.data.store import PatchStore
from histoscreen.errors import InputError
from histoscreen.scoring.calibration import ThresholdRule
from histoscreen.models.bundle import ModelMetadata, load_model
from histoscreen.runtime.device import pick_device

if TYPE_CHECKING:
    import torch


def calibrate(
    store_path: str | os.PathLike,
    model_path: str | os.PathLike,
    *,
    split_spec: SplitSpec = SplitSpec(),
    rule: ThresholdRule = ThresholdRule(),
    context_model: str = "blend",
    device: str = "auto",
) -> tuple[torch.nn.Module, ModelMetadata]:
    from histoscreen.runtime.forward import fit_scoring_on  # torch, imported only where it runs

    model, metadata = load_model(model_path)
    store = PatchStore(store_path)
    split = split_spec.resolve(store.patient_table())
    val = StoreSource(store, split.val).read_all()
    if len(val) == 0:
        raise InputError(f"{store.path}: no patches of the val patients of the {split.name} split")
    if val.labels.all() or not val.labels.any():
        raise InputError(f"{store.path}: the val patients hold only one class; calibration needs both")
    scoring, validation = fit_scoring_on(
        model, metadata.normalisation, val, rule=rule, context_model=context_model, device=pick_device(device)
    )
    metadata.scoring = scoring
    metadata.validation = replace(
        validation,
        split=f"{split.name}/val",
        patients=tuple(sorted(set(val.patients.tolist()), key=patient_sort_key)),
        store=str(store.path.resolve()),
    )
    return model.cpu(), metadata
