"""Batched prediction: a model, its calibration and threshold, applied to stores, folders
and files. The one inference path that `predict`, `evaluate` and screening share."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histoscreen import HistoscreenError
from histoscreen.atomic import atomic_folder
from histoscreen.data.ingest import Reject
from histoscreen.data.naming import parse_patch_name
from histoscreen.data.patch_files import decode_files, find_files
from histoscreen.data.splits import resolve_split
from histoscreen.data.store import MANIFEST_FILE, PatchStore
from histoscreen.evaluation import (
    bootstrap_by_patient,
    classification_metrics,
    per_patient_table,
    sigmoid,
    write_plots,
)
from histoscreen.models.checkpoint import load_model
from histoscreen.data.transforms import DIHEDRAL_VIEWS
from histoscreen.backends import OnnxRunner, resolve_backend
from histoscreen.models.forward import batched_view_logits, pick_device
from histoscreen.progress import Progress, silent

SHIPPED_MODEL_NAME = "idc-compact"


def shipped_model_path() -> Path:
    """The model trained on the real official-train patients that ships with the package."""
    return Path(str(resources.files("histoscreen.models") / "shipped" / f"{SHIPPED_MODEL_NAME}.safetensors"))


class Predictor:
    """A loaded model with the temperature and threshold that go with the chosen mode, run
    by torch or ONNX Runtime (`backend`: auto picks ONNX Runtime on CPU when installed)."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        tta: bool = False,
        device: str = "auto",
        batch_size: int = 256,
        backend: str = "auto",
    ):
        self.model_path = Path(model_path) if model_path is not None else shipped_model_path()
        self.device = pick_device(device)
        model, self.metadata = load_model(self.model_path)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.backend = resolve_backend(backend, self.device)
        self.onnx = OnnxRunner(model, self.metadata, device=self.device) if self.backend == "onnx" else None
        self.model.to(self.device)
        self.tta = tta
        self.batch_size = batch_size

    @property
    def temperature(self) -> float:
        return self.metadata.tta_temperature if self.tta else self.metadata.temperature

    @property
    def bias(self) -> float:
        return self.metadata.tta_bias if self.tta else self.metadata.bias

    @property
    def threshold(self) -> float:
        return self.metadata.tta_threshold if self.tta else self.metadata.threshold

    def view_logits(self, patches: np.ndarray) -> np.ndarray:
        """Raw logits, views x N: one view, or the 8 dihedral ones with TTA."""
        views = DIHEDRAL_VIEWS if self.tta else 1
        if self.onnx is not None:
            return self.onnx.view_logits(patches, views=views, batch_size=self.batch_size)
        return batched_view_logits(
            self.model, patches, self.metadata.normalisation, views=views, batch_size=self.batch_size, device=self.device
        )

    def probabilities(self, patches: np.ndarray) -> np.ndarray:
        """Calibrated IDC probabilities for N x 50 x 50 x 3 uint8 patches."""
        return sigmoid(self.view_logits(patches).mean(0) / self.temperature + self.bias)

    def probabilities_with_disagreement(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities, and which patches' dihedral views fall on both sides of
        the threshold (always False without TTA)."""
        views = self.view_logits(patches)
        calls = sigmoid(views / self.temperature + self.bias) >= self.threshold
        probabilities = sigmoid(views.mean(0) / self.temperature + self.bias)
        return probabilities, calls.any(0) & ~calls.all(0)


@dataclass
class PatchBatch:
    """Patches travelling together from a source to the model, with where they came from."""

    pixels: np.ndarray
    paths: list[str]
    patients: list[str | None]
    xs: list[int | None]
    ys: list[int | None]


@dataclass
class PredictSummary:
    out: Path
    patches: int
    idc_patches: int
    seconds: float
    rejects: list[Reject] = field(default_factory=list)
    rejects_path: Path | None = None

    def lines(self) -> list[str]:
        rate = self.patches / self.seconds if self.seconds else 0.0
        return [
            f"predictions: {self.out}",
            f"patches: {self.patches:,} predicted, {self.idc_patches:,} called IDC, in {self.seconds:.1f} s ({rate:,.0f} patches/s)",
            f"rejected files: {len(self.rejects):,}" + (f" (see {self.rejects_path})" if self.rejects_path else ""),
        ]


def iterate_patches(
    inputs: Sequence[str | os.PathLike],
    *,
    batch_size: int = 256,
    workers: int | None = None,
    rejects: list[Reject],
    progress: Progress = silent,
) -> Iterator[PatchBatch]:
    """Patches from packed stores, folders (searched recursively) and single files, in
    batches; files that are not valid patches are appended to `rejects`, never fatal."""
    stores, files = [], []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise HistoscreenError(f"{path}: no such file or folder")
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            stores.append(PatchStore(path))
        elif path.is_dir():
            found = find_files(path)
            if not found:
                raise HistoscreenError(f"{path}: the folder holds no files")
            files += found
        else:
            files.append(path)
    total = sum(len(s) for s in stores) + len(files)
    done = 0
    for store in stores:
        index = store.index
        for start in range(0, len(store), batch_size):
            part = index.iloc[start : start + batch_size]
            yield PatchBatch(
                np.asarray(store.patches[start : start + batch_size]),
                part["source"].tolist(),
                part["patient"].tolist(),
                part["x"].tolist(),
                part["y"].tolist(),
            )
            done += len(part)
            progress("predicting", done, total)

    candidates = []
    for path in files:
        if path.suffix.lower() != ".png":
            rejects.append(Reject(str(path), f"not a .png file (suffix {path.suffix or 'none'!r})"))
        else:
            candidates.append((path, str(path)))
    pending: list[tuple[np.ndarray, str]] = []
    for paths, chunk in decode_files(candidates, workers):
        for row, path in enumerate(paths):
            if chunk.reasons[row] is not None:
                rejects.append(Reject(str(path), chunk.reasons[row]))
            else:
                pending.append((chunk.pixels[row], str(path)))
        done += len(paths)
        while len(pending) >= batch_size:
            yield _file_batch(pending[:batch_size])
            pending = pending[batch_size:]
        progress("predicting", done, total)
    if pending:
        yield _file_batch(pending)


def _file_batch(decoded: list[tuple[np.ndarray, str]]) -> PatchBatch:
    names = [parse_patch_name(Path(path).name) for _, path in decoded]
    return PatchBatch(
        np.stack([pixels for pixels, _ in decoded]),
        [path for _, path in decoded],
        [n.patient if n else None for n in names],
        [n.x if n else None for n in names],
        [n.y if n else None for n in names],
    )


def predict(
    inputs: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    tta: bool = False,
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    progress: Progress = silent,
) -> PredictSummary:
    """Write one CSV row per patch: path, patient, x, y, prob_idc, pred (0/1 at the model's
    threshold). Unparsable names leave patient, x and y empty. Bad files go to
    OUT.rejects.csv beside the predictions."""
    started = time.perf_counter()
    out_csv = Path(out_csv)
    predictor = Predictor(model, tta=tta, device=device, batch_size=batch_size, backend=backend)
    rejects: list[Reject] = []
    patches = idc = 0
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "patient", "x", "y", "prob_idc", "pred"])
            for batch in iterate_patches(inputs, batch_size=batch_size, workers=workers, rejects=rejects, progress=progress):
                probabilities = predictor.probabilities(batch.pixels)
                calls = probabilities >= predictor.threshold
                for path, patient, x, y, probability, call in zip(batch.paths, batch.patients, batch.xs, batch.ys, probabilities, calls):
                    writer.writerow([path, patient or "", "" if x is None else x, "" if y is None else y, f"{probability:.6f}", int(call)])
                patches += len(probabilities)
                idc += int(calls.sum())
        os.replace(partial, out_csv)
    finally:
        partial.unlink(missing_ok=True)
    rejects_path = None
    if rejects:
        rejects_path = out_csv.with_suffix(".rejects.csv")
        pd.DataFrame([(r.path, r.reason) for r in rejects], columns=["path", "reason"]).to_csv(rejects_path, index=False)
    return PredictSummary(out_csv, patches, idc, time.perf_counter() - started, rejects, rejects_path)


def evaluate(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    split: str = "test",
    scheme: str = "official",
    split_options: dict | None = None,
    tta: bool = False,
    bootstrap_rounds: int = 1000,
    device: str = "auto",
    backend: str = "auto",
    overwrite: bool = False,
    progress: Progress = silent,
) -> dict:
    """Metrics with patient-bootstrap 95% intervals, a per-patient table and plots for the
    patients of one split of a store. Writes OUT/metrics.json, per_patient.csv, *.png."""
    store = PatchStore(store_path)
    chosen = resolve_split(store.patient_table(), scheme, **(split_options or {}))
    patients = chosen.patients(split)
    rows = store.rows_of(patients)
    if len(rows) == 0:
        raise HistoscreenError(f"{store.path}: no patches of the {split} patients of the {chosen.name} split")
    predictor = Predictor(model, tta=tta, device=device, backend=backend)
    probabilities = np.concatenate(
        [predictor.probabilities(store.patches[rows[i : i + 8192]]) for i in range(0, len(rows), 8192)]
    )
    labels = store.labels[rows]
    patient_of_row = store.index["patient"].to_numpy()[rows]
    threshold = predictor.threshold
    metrics = classification_metrics(labels, probabilities, threshold)
    intervals = bootstrap_by_patient(labels, probabilities, patient_of_row, threshold, rounds=bootstrap_rounds)
    report = {
        "measured_on": {
            "store": str(store.path.resolve()),
            "split": f"{chosen.name}/{split}",
            "patients": len(set(patient_of_row)),
            "patches": int(len(rows)),
            "idc_patches": int(labels.sum()),
        },
        "model": str(predictor.model_path),
        "backend": predictor.backend,
        "tta": tta,
        "threshold": threshold,
        "temperature": predictor.temperature,
        "bias": predictor.bias,
        "metrics": metrics,
        "confidence_95": {name: [i.low, i.high] for name, i in intervals.items()},
        "bootstrap": f"{bootstrap_rounds} resamples of patients with replacement",
    }
    with atomic_folder(Path(out_dir), overwrite=overwrite) as partial:
        (partial / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        per_patient_table(labels, probabilities, patient_of_row, threshold).to_csv(partial / "per_patient.csv", index=False)
        report["plots"] = write_plots(
            labels, probabilities, threshold, partial,
            title=f"{split} ({len(set(patient_of_row))} patients)",
            history=predictor.metadata.training.get("history"),
        )
    progress("evaluating", 1, 1)
    return report
