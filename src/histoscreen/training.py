"""Training: one loop in plain sight (forward, loss, backward, step, log, checkpoint).

Patients of the train split are trained on; the epoch with the best balanced accuracy on
the val patients is kept; the decision threshold and temperature are then fitted on the
val patients only. Every epoch leaves a checkpoint, and `resume` continues a killed run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from histoscreen import HistoscreenError, __version__
from histoscreen.atomic import atomic_write_bytes, atomic_write_text
from histoscreen.data.naming import patient_sort_key
from histoscreen.data.splits import resolve_split
from histoscreen.data.store import PatchStore
from histoscreen.data.transforms import Normalisation, augment
from histoscreen.evaluation import choose_threshold, classification_metrics, confusion_counts, fit_calibration, sigmoid
from histoscreen.models import count_flops, create_model
from histoscreen.models.checkpoint import ModelMetadata, load_model, read_safetensors, save_model
from histoscreen.models.context import CONTEXT_RADII, CONTEXT_WEIGHTS, SlidePositions, blend_with_neighbours
from histoscreen.models.forward import batched_logits, pick_device
from histoscreen.progress import Progress, silent

CHECKPOINTS = "checkpoints"
STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"
METRICS_LOG = "metrics.jsonl"
BALANCE_CHOICES = ("weighted", "sampler", "none")


@dataclass
class TrainConfig:
    architecture: str = "compact"
    architecture_kwargs: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    balance: str = "weighted"  # weighted loss, balanced sampling, or neither
    stain_jitter: float = 0.05  # HED scale and shift; 0 turns stain and colour jitter off
    seed: int = 0
    split: str = "official"
    extra_to_train: bool = False
    folds: int = 5
    fold: int = 1
    split_seed: int = 0  # kfold: the fold assignment's seed, apart from the training seed
    split_csv: str | None = None
    min_sensitivity: float | None = None  # threshold rule; None maximises balanced accuracy
    max_train_patches: int | None = None  # a seeded subsample, for quick runs
    device: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        if self.balance not in BALANCE_CHOICES:
            raise HistoscreenError(f"balance must be one of {', '.join(BALANCE_CHOICES)}, got {self.balance!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise HistoscreenError("epochs and batch size must be at least 1")
        if self.min_sensitivity is not None and not 0 < self.min_sensitivity <= 1:
            raise HistoscreenError(f"min_sensitivity must be in (0, 1], got {self.min_sensitivity}")


@dataclass
class TrainResult:
    model_path: Path
    metadata: ModelMetadata
    history: list[dict]


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    patches: torch.Tensor,
    labels: torch.Tensor,
    normalisation: Normalisation,
    config: TrainConfig,
    epoch: int,
    first_step: int,
    total_steps: int,
    device: torch.device,
    progress: Progress,
) -> tuple[float, int]:
    """One pass over the training patches; returns the mean loss and the next global step."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    positives = float(labels.sum())
    if config.balance == "sampler":
        weights = torch.where(labels == 1, 1 / positives, 1 / (len(labels) - positives))
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    pos_weight = (len(labels) - positives) / positives if config.balance == "weighted" else 1.0
    loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    warmup_steps = int(config.warmup_epochs * math.ceil(len(labels) / config.batch_size))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    model.train()
    step, total_loss, batches = first_step, 0.0, range(0, len(order), config.batch_size)
    for number, start in enumerate(batches, start=1):
        rows = order[start : start + config.batch_size]
        images = augment(patches[rows], normalisation, generator, stain=config.stain_jitter).to(device, non_blocking=True)
        targets = labels[rows].float().to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total_steps, warmup_steps, config.learning_rate)
        with autocast:
            loss = loss_function(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(rows)
        step += 1
        progress(f"epoch {epoch}/{config.epochs}", number, len(batches))
    return total_loss / len(order), step


def evaluate_logits(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Validation figures for one epoch: at probability 0.5 and at the best threshold."""
    probabilities = sigmoid(logits)
    at_half = classification_metrics(labels, probabilities, 0.5)
    best = classification_metrics(labels, probabilities, choose_threshold(labels, probabilities))
    loss = float(np.mean(np.logaddexp(0, logits) - labels * logits))
    return {
        "val_loss": loss,
        "val_accuracy": at_half["accuracy"],
        "val_balanced_accuracy": at_half["balanced_accuracy"],
        "val_best_balanced_accuracy": best["balanced_accuracy"],
        "val_sensitivity": at_half["sensitivity"],
        "val_specificity": at_half["specificity"],
        "val_auc": at_half["roc_auc"],
    }


def train(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: Progress = silent,
    log: Callable[[str], None] = lambda line: None,
    command: str | None = None,
) -> TrainResult:
    """Train on the split's train patients, select and calibrate on its val patients.

    `command` is recorded in the model's metadata, so the run can be repeated from it.
    """
    config.check()
    out_dir = Path(out_dir)
    checkpoints = out_dir / CHECKPOINTS
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    store = PatchStore(store_path)
    split = resolve_split(
        store.patient_table(), config.split, extra_to_train=config.extra_to_train,
        folds=config.folds, fold=config.fold, seed=config.split_seed, csv_path=config.split_csv,
    )
    train_rows, val_rows = store.rows_of(split.train), store.rows_of(split.val)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise HistoscreenError(
            f"{store.path}: split {split.name!r} leaves {len(train_rows)} train and {len(val_rows)} val patches; "
            "both are needed (synthetic or unofficial patients need --split kfold or --split csv)"
        )
    if config.max_train_patches and config.max_train_patches < len(train_rows):
        rng = np.random.default_rng(config.seed)
        train_rows = np.sort(rng.choice(train_rows, config.max_train_patches, replace=False))
    all_labels = store.labels
    train_labels = torch.as_tensor(all_labels[train_rows])
    if train_labels.sum() == 0 or train_labels.sum() == len(train_labels):
        raise HistoscreenError("the train patients hold only one class; training needs IDC and non-IDC patches")
    val_labels = all_labels[val_rows]
    train_patches = torch.from_numpy(np.ascontiguousarray(store.patches[train_rows]))
    val_patches = np.ascontiguousarray(store.patches[val_rows])
    log(
        f"train: {len(split.train & set(store.patients))} patients, {len(train_rows):,} patches "
        f"({int(train_labels.sum()):,} IDC); val: {len(split.val)} patients, {len(val_rows):,} patches "
        f"({int(val_labels.sum()):,} IDC); device {device}"
    )

    torch.manual_seed(config.seed)
    model = create_model(config.architecture, **config.architecture_kwargs).to(device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    state = _load_state(checkpoints, config, model, optimizer) if resume else None
    if state is None:
        if (checkpoints / STATE_JSON).exists():
            raise HistoscreenError(f"{out_dir} holds a training run already; pass --resume to continue it or choose another folder")
        checkpoints.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": 0, "history": [], "best_epoch": None, "best_score": -1.0, "seconds": 0.0,
            "normalisation": asdict(Normalisation.of(train_patches.numpy(), seed=config.seed)),
        }
    elif state["epoch"] >= config.epochs:
        log(f"resuming: all {config.epochs} epochs were done; finishing")
    else:
        log(f"resuming after epoch {state['epoch']}")
    normalisation = Normalisation(tuple(state["normalisation"]["mean"]), tuple(state["normalisation"]["std"]))

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, _ = train_one_epoch(
            model, optimizer, train_patches, train_labels, normalisation, config, epoch,
            (epoch - 1) * steps_per_epoch, total_steps, device, progress,
        )
        record = {"epoch": epoch, "train_loss": train_loss, "learning_rate": optimizer.param_groups[0]["lr"]}
        record.update(evaluate_logits(val_labels, batched_logits(model, val_patches, normalisation, device=device)))
        record["seconds"] = time.perf_counter() - started
        state["history"].append(record)
        state["seconds"] += record["seconds"]
        state["epoch"] = epoch
        if record["val_best_balanced_accuracy"] > state["best_score"]:
            state["best_score"], state["best_epoch"] = record["val_best_balanced_accuracy"], epoch
            atomic_write_bytes(checkpoints / BEST_WEIGHTS, safetensors_bytes(_cpu_tensors(model.state_dict())))
        _save_state(checkpoints, config, model, optimizer, state)
        atomic_write_text(out_dir / METRICS_LOG, "".join(json.dumps(r) + "\n" for r in state["history"]))
        log(
            f"epoch {epoch}/{config.epochs}: loss {train_loss:.4f}, val balanced accuracy {record['val_balanced_accuracy']:.4f} "
            f"(best threshold {record['val_best_balanced_accuracy']:.4f}), AUC {record['val_auc']:.4f}, {record['seconds']:.0f} s"
        )

    model.load_state_dict(read_safetensors(checkpoints / BEST_WEIGHTS))
    metadata = ModelMetadata(
        architecture=config.architecture,
        architecture_kwargs=config.architecture_kwargs,
        normalisation=normalisation,
        training={
            "config": asdict(config),
            "best_epoch": state["best_epoch"],
            "history": state["history"],
            "train_patients": sorted(split.train & set(store.patients), key=patient_sort_key),
            "val_patients": sorted(split.val & set(store.patients), key=patient_sort_key),
            "train_patches": int(len(train_rows)),
            "train_idc_patches": int(train_labels.sum()),
            "val_patches": int(len(val_rows)),
            "val_idc_patches": int(val_labels.sum()),
            "store": str(store.path.resolve()),
            "seconds": round(state["seconds"], 1),
            "device": str(device),
            "machine": machine_description(device),
            "command": command,
            "torch": torch.__version__,
            "histoscreen": __version__,
            "flops_per_patch": count_flops(model.cpu()),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    )
    model.to(device)
    val_index = store.index.iloc[val_rows]
    calibrate(
        model, metadata, val_patches, val_labels,
        positions=SlidePositions.of(val_index["patient"].tolist(), val_index["x"].tolist(), val_index["y"].tolist()),
        patients=val_index["patient"].to_numpy(dtype=object),
        min_sensitivity=config.min_sensitivity, device=device,
    )
    model_path = save_model(model.cpu(), metadata, out_dir / "model.safetensors")
    log(f"model: {model_path} (val: {_summary(metadata.validation['plain'])})")
    return TrainResult(model_path, metadata, state["history"])


def calibrate(
    model: torch.nn.Module,
    metadata: ModelMetadata,
    patches: np.ndarray,
    labels: np.ndarray,
    *,
    positions: SlidePositions | None = None,
    patients: np.ndarray | None = None,
    min_sensitivity: float | None = None,
    device: torch.device | None = None,
) -> None:
    """Fit temperature and bias, then the threshold on calibrated probabilities, with and
    without TTA; with `positions`, also the slide context (radius and weight by balanced
    accuracy, then its own temperature, bias and threshold).

    Only ever called on val patients: a threshold tuned on test would flatter every figure.
    `patients` (one per patch) adds leave-one-patient-out estimates of how the choices made
    here carry over to a patient they were not made on.
    """
    context: dict = {}
    for tta, prefix in ((False, ""), (True, "tta_")):
        mode = "tta" if tta else "plain"
        logits = batched_logits(model, patches, metadata.normalisation, tta=tta, device=device)
        temperature, bias = fit_calibration(labels, logits)
        calibrated = logits / temperature + bias
        threshold = choose_threshold(labels, sigmoid(calibrated), min_sensitivity)
        setattr(metadata, f"{prefix}temperature", temperature)
        setattr(metadata, f"{prefix}bias", bias)
        setattr(metadata, f"{prefix}threshold", threshold)
        metadata.validation[mode] = classification_metrics(labels, sigmoid(calibrated), threshold)
        if positions is None:
            continue
        candidates = {
            (radius, weight): blend_with_neighbours(calibrated, positions, radius, weight)
            for radius in CONTEXT_RADII
            for weight in CONTEXT_WEIGHTS
        }
        if not tta:
            context["radius"], context["weight"] = max(
                candidates, key=lambda key: _best_balanced_accuracy(labels, candidates[key], min_sensitivity)
            )
        mixed = candidates[(context["radius"], context["weight"])]
        context_temperature, context_bias = fit_calibration(labels, mixed)
        probabilities = sigmoid(mixed / context_temperature + context_bias)
        context[f"{prefix}temperature"] = context_temperature
        context[f"{prefix}bias"] = context_bias
        context[f"{prefix}threshold"] = choose_threshold(labels, probabilities, min_sensitivity)
        metadata.validation[f"context_{mode}"] = classification_metrics(labels, probabilities, context[f"{prefix}threshold"])
        if patients is not None:
            metadata.validation[f"leave_one_patient_out_{mode}"] = {
                "patch": leave_one_patient_out(labels, patients, {"patch": calibrated}, min_sensitivity),
                "context": leave_one_patient_out(labels, patients, candidates, min_sensitivity),
            }
    metadata.context = context
    metadata.validation["threshold_rule"] = (
        "max balanced accuracy" if min_sensitivity is None else f"max specificity with sensitivity >= {min_sensitivity}"
    )


def recalibrate(
    store_path: str | os.PathLike,
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scheme: str = "official",
    split_options: dict | None = None,
    min_sensitivity: float | None = None,
    device: str = "auto",
) -> tuple[ModelMetadata, Path]:
    """Refit a model's temperature, bias, thresholds and slide context on the val patients
    of a store, and save it (weights unchanged) to `out` (a .safetensors path or a folder)."""
    model, metadata = load_model(model_path)
    store = PatchStore(store_path)
    split = resolve_split(store.patient_table(), scheme, **(split_options or {}))
    rows = store.rows_of(split.val)
    if len(rows) == 0:
        raise HistoscreenError(f"{store.path}: no patches of the val patients of the {split.name} split")
    labels = store.labels[rows]
    if labels.all() or not labels.any():
        raise HistoscreenError(f"{store.path}: the val patients hold only one class; calibration needs both")
    index = store.index.iloc[rows]
    torch_device = pick_device(device)
    calibrate(
        model.to(torch_device), metadata, np.ascontiguousarray(store.patches[rows]), labels,
        positions=SlidePositions.of(index["patient"].tolist(), index["x"].tolist(), index["y"].tolist()),
        patients=index["patient"].to_numpy(dtype=object), min_sensitivity=min_sensitivity, device=torch_device,
    )
    metadata.validation["split"] = f"{split.name}/val"
    metadata.validation["patients"] = sorted(set(index["patient"]), key=patient_sort_key)
    metadata.validation["store"] = str(store.path.resolve())
    out = Path(out)
    target = out if out.suffix == ".safetensors" else out / "model.safetensors"
    return metadata, save_model(model.cpu(), metadata, target)


def _best_balanced_accuracy(labels: np.ndarray, scores: np.ndarray, min_sensitivity: float | None) -> float:
    return classification_metrics(labels, scores, choose_threshold(labels, scores, min_sensitivity))["balanced_accuracy"]


def leave_one_patient_out(
    labels: np.ndarray, patients: np.ndarray, candidates: dict, min_sensitivity: float | None = None
) -> dict:
    """How choices made on val patients carry over to a new patient: for each patient, pick
    the candidate scoring and its threshold on all the others, then call that patient's
    patches with them. Returns the pooled accuracy, balanced accuracy, sensitivity and
    specificity of those calls (a threshold is a monotone cut, so scores need no
    calibration here)."""
    calls = np.zeros(len(labels), dtype=bool)
    for patient in np.unique(patients):
        held = patients == patient
        rest = ~held
        best = max(candidates, key=lambda key: _best_balanced_accuracy(labels[rest], candidates[key][rest], min_sensitivity))
        scores = candidates[best]
        calls[held] = scores[held] >= choose_threshold(labels[rest], scores[rest], min_sensitivity)
    tn, fp, fn, tp = confusion_counts(labels, calls)
    sensitivity, specificity = tp / max(1, tp + fn), tn / max(1, tn + fp)
    return {
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "patients": int(len(np.unique(patients))),
    }


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _summary(metrics: dict) -> str:
    return (
        f"accuracy {metrics['accuracy']:.4f}, sensitivity {metrics['sensitivity']:.4f}, "
        f"specificity {metrics['specificity']:.4f}, AUC {metrics['roc_auc']:.4f}"
    )


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def _save_state(checkpoints: Path, config: TrainConfig, model, optimizer, state: dict) -> None:
    """Model and optimizer tensors as safetensors, everything else as JSON.

    The tensors go to a file named for the epoch and the JSON, written last, names it:
    the JSON is the commit point, so a kill at any moment leaves a consistent pair.
    """
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    tensor_file = f"epoch-{state['epoch']:03d}.safetensors"
    atomic_write_bytes(checkpoints / tensor_file, safetensors_bytes(_cpu_tensors(tensors)))
    payload = {**state, "tensors": tensor_file, "config": asdict(config), "param_groups": optimizer_state["param_groups"]}
    atomic_write_text(checkpoints / STATE_JSON, json.dumps(payload, indent=1) + "\n")
    for older in checkpoints.glob("epoch-*.safetensors"):
        if older.name != tensor_file:
            older.unlink()


def _load_state(checkpoints: Path, config: TrainConfig, model, optimizer) -> dict | None:
    if not (checkpoints / STATE_JSON).is_file():
        return None
    state = json.loads((checkpoints / STATE_JSON).read_text())
    saved_config = state.pop("config")
    if saved_config != asdict(config):
        changed = sorted(k for k in saved_config if saved_config[k] != asdict(config).get(k))
        raise HistoscreenError(f"{checkpoints}: --resume needs the same settings as the killed run; changed: {', '.join(changed)}")
    tensors = read_safetensors(checkpoints / state.pop("tensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    return state
