"""Batched prediction: a model, its calibration and threshold, applied to stores, folders
and files. The one inference path that `predict`, `evaluate` and screening share."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
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
from histoscreen.models.context import SlidePositions, blend_with_neighbours
from histoscreen.data.transforms import DIHEDRAL_VIEWS
from histoscreen.backends import OnnxRunner, resolve_backend
from histoscreen.models.forward import batched_view_logits, pick_device
from histoscreen.progress import Progress, silent

SHIPPED_MODEL_NAME = "idc-residual"


def shipped_model_path() -> Path:
    """The model trained on the real official-train patients that ships with the package."""
    return Path(str(resources.files("histoscreen.models") / "shipped" / f"{SHIPPED_MODEL_NAME}.safetensors"))


class Predictor:
    """A loaded model with the temperature and threshold that go with the chosen mode, run
    by torch or ONNX Runtime (`backend`: auto picks ONNX Runtime on CPU when installed).

    With `context`, a patch's score is blended with its neighbours' on the slide
    (models/context.py) and the context calibration and threshold apply; that needs every
    patch of a slide at once, with its position.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        tta: bool = False,
        context: bool = False,
        device: str = "auto",
        batch_size: int = 256,
        backend: str = "auto",
    ):
        self.model_path = Path(model_path) if model_path is not None else shipped_model_path()
        self.device = pick_device(device)
        model, self.metadata = load_model(self.model_path)
        if context and not self.metadata.context:
            raise HistoscreenError(
                f"{self.model_path}: this model has no slide-context calibration; "
                "fit one with 'histoscreen calibrate STORE --model MODEL --out NEW_MODEL'"
            )
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.backend = resolve_backend(backend, self.device)
        self.onnx = OnnxRunner(model, self.metadata, device=self.device) if self.backend == "onnx" else None
        self.model.to(self.device)
        self.tta = tta
        self.context = context
        self.batch_size = batch_size

    @property
    def _prefix(self) -> str:
        return "tta_" if self.tta else ""

    @property
    def temperature(self) -> float:
        """Of the patch logit (the context step has its own, in `metadata.context`)."""
        return getattr(self.metadata, f"{self._prefix}temperature")

    @property
    def bias(self) -> float:
        return getattr(self.metadata, f"{self._prefix}bias")

    @property
    def patch_threshold(self) -> float:
        return getattr(self.metadata, f"{self._prefix}threshold")

    @property
    def threshold(self) -> float:
        """The threshold that goes with `probabilities`: the context one with context."""
        return self.metadata.context[f"{self._prefix}threshold"] if self.context else self.patch_threshold

    def settings(self) -> dict:
        """What decides the calls, for reports."""
        settings = {"model": str(self.model_path), "backend": self.backend, "tta": self.tta, "context": self.context,
                    "threshold": self.threshold, "temperature": self.temperature, "bias": self.bias}
        if self.context:
            settings["context_settings"] = {key: self.metadata.context[key] for key in ("radius", "weight")} | {
                key: self.metadata.context[f"{self._prefix}{key}"] for key in ("temperature", "bias")
            }
        return settings

    def view_logits(self, patches: np.ndarray) -> np.ndarray:
        """Raw logits, views x N: one view, or the 8 dihedral ones with TTA."""
        views = DIHEDRAL_VIEWS if self.tta else 1
        if self.onnx is not None:
            return self.onnx.view_logits(patches, views=views, batch_size=self.batch_size)
        return batched_view_logits(
            self.model, patches, self.metadata.normalisation, views=views, batch_size=self.batch_size, device=self.device
        )

    def patch_logits(self, patches: np.ndarray) -> np.ndarray:
        """Calibrated logits of each patch on its own."""
        return self.view_logits(patches).mean(0) / self.temperature + self.bias

    def finish(self, patch_logits: np.ndarray, positions: SlidePositions | None = None) -> np.ndarray:
        """Probabilities from calibrated patch logits: sigmoid, or with context, blended with
        the neighbours among the same `positions` (all the patches of the slides at hand)."""
        if not self.context:
            return sigmoid(patch_logits)
        context = self.metadata.context
        if positions is None:
            positions = SlidePositions.of([None] * len(patch_logits), [None] * len(patch_logits), [None] * len(patch_logits))
        mixed = blend_with_neighbours(patch_logits, positions, context["radius"], context["weight"])
        return sigmoid(mixed / context[f"{self._prefix}temperature"] + context[f"{self._prefix}bias"])

    def probabilities(self, patches: np.ndarray, positions: SlidePositions | None = None) -> np.ndarray:
        """Calibrated IDC probabilities for N x 50 x 50 x 3 uint8 patches."""
        return self.finish(self.patch_logits(patches), positions)

    def probabilities_with_disagreement(
        self, patches: np.ndarray, positions: SlidePositions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities, and which patches' dihedral views fall on both sides of
        the patch threshold (always False without TTA)."""
        views = self.view_logits(patches) / self.temperature + self.bias
        calls = sigmoid(views) >= self.patch_threshold
        return self.finish(views.mean(0), positions), calls.any(0) & ~calls.all(0)


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
    context: bool = False,
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    progress: Progress = silent,
) -> PredictSummary:
    """Write one CSV row per patch: path, patient, x, y, prob_idc, pred (0/1 at the model's
    threshold). Unparsable names leave patient, x and y empty. Bad files go to
    OUT.rejects.csv beside the predictions. With `context`, every patch is predicted before
    any row is written, as a patch's neighbours may come later."""
    started = time.perf_counter()
    out_csv = Path(out_csv)
    predictor = Predictor(model, tta=tta, context=context, device=device, batch_size=batch_size, backend=backend)
    rejects: list[Reject] = []
    patches = idc = 0
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "patient", "x", "y", "prob_idc", "pred"])
            held: list[tuple[PatchBatch, np.ndarray]] = []
            for batch in iterate_patches(inputs, batch_size=batch_size, workers=workers, rejects=rejects, progress=progress):
                logits = predictor.patch_logits(batch.pixels)
                if context:
                    held.append((replace(batch, pixels=np.empty(0)), logits))
                else:
                    idc += _write_predictions(writer, batch, predictor.finish(logits), predictor.threshold)
                patches += len(logits)
            if held:
                whole = PatchBatch(np.empty(0), [], [], [], [])
                for batch, _ in held:
                    whole.paths += batch.paths
                    whole.patients += batch.patients
                    whole.xs += batch.xs
                    whole.ys += batch.ys
                positions = SlidePositions.of(whole.patients, whole.xs, whole.ys)
                probabilities = predictor.finish(np.concatenate([logits for _, logits in held]), positions)
                idc += _write_predictions(writer, whole, probabilities, predictor.threshold)
        os.replace(partial, out_csv)
    finally:
        partial.unlink(missing_ok=True)
    rejects_path = None
    if rejects:
        rejects_path = out_csv.with_suffix(".rejects.csv")
        pd.DataFrame([(r.path, r.reason) for r in rejects], columns=["path", "reason"]).to_csv(rejects_path, index=False)
    return PredictSummary(out_csv, patches, idc, time.perf_counter() - started, rejects, rejects_path)


def _write_predictions(writer, batch: PatchBatch, probabilities: np.ndarray, threshold: float) -> int:
    """One CSV row per patch; returns how many were called IDC."""
    calls = probabilities >= threshold
    for path, patient, x, y, probability, call in zip(batch.paths, batch.patients, batch.xs, batch.ys, probabilities, calls):
        writer.writerow([path, patient or "", "" if x is None else x, "" if y is None else y, f"{probability:.6f}", int(call)])
    return int(calls.sum())


def evaluate(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    split: str = "test",
    scheme: str = "official",
    split_options: dict | None = None,
    tta: bool = False,
    context: bool = False,
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
    predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
    logits = np.concatenate([predictor.patch_logits(store.patches[rows[i : i + 8192]]) for i in range(0, len(rows), 8192)])
    chosen_index = store.index.iloc[rows]
    probabilities = predictor.finish(
        logits, SlidePositions.of(chosen_index["patient"].tolist(), chosen_index["x"].tolist(), chosen_index["y"].tolist())
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
        **predictor.settings(),
        "metrics": metrics,
        "confidence_95": {name: [i.low, i.high] for name, i in intervals.items()},
        "bootstrap": f"{bootstrap_rounds} resamples of patients with replacement",
    }
    with atomic_folder(Path(out_dir), overwrite=overwrite) as partial:
        (partial / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        per_patient_table(labels, probabilities, patient_of_row, threshold).to_csv(partial / "per_patient.csv", index=False)
        report["plots"] = write_plots(
            labels, probabilities, threshold, partial,
            title=f"{split} ({len(set(patient_of_row))} patients{', dihedral TTA' if tta else ''}{', slide context' if context else ''})",
            history=predictor.metadata.training.get("history"),
        )
    progress("evaluating", 1, 1)
    return report
