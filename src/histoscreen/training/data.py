"""What a run trains and selects on: the split's patches in memory and the targets the loss
is taken against (the labels, border-smoothed near region edges, distilled from teachers)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from histoscreen.data.grid import SlidePositions
from histoscreen.data.naming import patient_sort_key
from histoscreen.data.sources import PatchBatch, StoreSource
from histoscreen.data.splits import PatientSplit
from histoscreen.data.store import PatchStore
from histoscreen.errors import InputError
from histoscreen.models.bundle import load_model
from histoscreen.runtime.device import pick_device
from histoscreen.runtime.forward import batched_logits
from histoscreen.scoring.context import neighbour_means
from histoscreen.scoring.metrics import sigmoid
from histoscreen.training.config import TrainConfig


@dataclass
class TrainingData:
    """The patients and patches one run trains and selects on, loaded into memory."""

    store: PatchStore
    split: PatientSplit
    train_patches: torch.Tensor  # uint8 N x 50 x 50 x 3
    train_labels: torch.Tensor
    train_targets: torch.Tensor  # float: the labels, or their border-smoothed version
    val: PatchBatch  # with pixels, labels and slide positions (for the context fit)

    def describe(self) -> dict:
        present = set(self.store.patients)
        return {
            "train_patients": sorted(self.split.train & present, key=patient_sort_key),
            "val_patients": sorted(self.split.val & present, key=patient_sort_key),
            "train_patches": int(len(self.train_labels)),
            "train_idc_patches": int(self.train_labels.sum()),
            "val_patches": int(len(self.val)),
            "val_idc_patches": int(self.val.labels.sum()),
            "store": str(self.store.path.resolve()),
        }


def load_training_data(store_path: str | os.PathLike, config: TrainConfig, device: torch.device | None = None) -> TrainingData:
    """The split's patches in memory, with the training targets (border-smoothed, distilled)."""
    store = PatchStore(store_path)
    split = config.split.resolve(store.patient_table())
    train_rows, val_rows = store.rows_of(split.train), store.rows_of(split.val)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise InputError(
            f"{store.path}: split {split.name!r} leaves {len(train_rows)} train and {len(val_rows)} val patches; "
            "both are needed (synthetic or unofficial patients need the kfold or csv split scheme)"
        )
    if config.max_train_patches and config.max_train_patches < len(train_rows):
        rng = np.random.default_rng(config.seed)
        train_rows = np.sort(rng.choice(train_rows, config.max_train_patches, replace=False))
    train_labels = torch.as_tensor(store.labels[train_rows])
    if train_labels.sum() == 0 or train_labels.sum() == len(train_labels):
        raise InputError(f"{store.path}: the train patients hold only one class; training needs IDC and non-IDC patches")
    train_patches = torch.from_numpy(np.ascontiguousarray(store.patches[train_rows]))
    targets = train_labels.double().numpy()
    if config.border_smoothing > 0:
        part = store.index.iloc[train_rows]
        positions = SlidePositions.of(part["patient"].to_numpy(dtype=object), part["x"].to_numpy(), part["y"].to_numpy())
        means, counts = neighbour_means(targets, positions, radius=1)
        targets = np.where(counts > 0, (1 - config.border_smoothing) * targets + config.border_smoothing * means, targets)
    if config.teachers:
        taught = sigmoid(teacher_logits(config.teachers, train_patches.numpy(), device or pick_device(config.device)))
        targets = (1 - config.distil_weight) * targets + config.distil_weight * taught
    val = StoreSource(store, split.val).read_all()
    return TrainingData(store, split, train_patches, train_labels, torch.as_tensor(targets, dtype=torch.float32), val)


def teacher_logits(teachers: list[str], patches: np.ndarray, device: torch.device) -> np.ndarray:
    """The teachers' mean logit over the 8 dihedral views and over the teachers."""
    total = np.zeros(len(patches))
    for path in teachers:
        model, metadata = load_model(path)  # safetensors and JSON: nothing is unpickled
        total += batched_logits(model.to(device), patches, metadata.normalisation, tta=True, batch_size=1024, device=device)
    return total / len(teachers)
