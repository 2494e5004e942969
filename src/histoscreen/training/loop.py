"""Training: one loop in plain sight (forward, loss, backward, step, log, checkpoint).

Patients of the train split are trained on; the epoch with the best balanced accuracy on
the val patients is kept; calibration, threshold and slide context are then fitted on the
val patients only. Every epoch leaves a checkpoint, and `resume` continues a killed run.
Read top to bottom: load the data, build the model, loop over epochs, finalise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from histoscreen import __version__
from histoscreen.atomic import atomic_write_bytes, atomic_write_text
from histoscreen.data.transforms import AugmentationDraw, Normalisation, augment
from histoscreen.errors import RunExistsError
from histoscreen.models import count_flops, create_model
from histoscreen.models.bundle import ModelMetadata, load_model, read_safetensors, save_model
from histoscreen.progress import Progress, silent
from histoscreen.runtime.device import machine_description
from histoscreen.runtime.forward import batched_logits, fit_scoring_on
from histoscreen.scoring.calibration import choose_threshold
from histoscreen.scoring.metrics import classification_metrics, sigmoid
from histoscreen.training.checkpoints import (
    BEST_WEIGHTS, CHECKPOINTS, METRICS_LOG, STATE_JSON, best_weights_bytes, check_run_folder, load_state, save_state,
)
from histoscreen.training.config import TrainConfig
from histoscreen.training.data import TrainingData, load_training_data
from histoscreen.training.ranks import Ranks, gather_rng_states, join_torchrun, share_of


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
    targets: torch.Tensor,
    normalisation: Normalisation,
    config: TrainConfig,
    epoch: int,
    first_step: int,
    total_steps: int,
    device: torch.device,
    progress: Progress,
    ranks: Ranks = Ranks(),
) -> tuple[float, int]:
    """One pass over the training patches; returns the mean loss and the next global step.

    The epoch's order and augmentations come from a generator seeded by the epoch, so a
    resumed run draws the same ones without any saved state, and every rank of a torchrun
    job draws the same global batches. Each rank takes its contiguous share of a global
    batch; its loss is scaled so that DistributedDataParallel's mean over ranks is the mean
    over the global batch: the batch size and learning rate stay what the user set."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    positives = float(labels.sum())
    if config.balance == "sampler":
        weights = torch.where(labels == 1, 1 / positives, 1 / (len(labels) - positives))
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    pos_weight = (len(labels) - positives) / positives if config.balance == "weighted" else 1.0
    loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device), reduction="sum")
    warmup_steps = int(config.warmup_epochs * math.ceil(len(labels) / config.batch_size))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    model.train()
    step, total_loss, batches = first_step, torch.zeros((), dtype=torch.float64), range(0, len(order), config.batch_size)
    for number, start in enumerate(batches, start=1):
        rows = order[start : start + config.batch_size]
        draw = AugmentationDraw.sample(len(rows), generator, stain=config.stain_jitter)
        share = share_of(len(rows), ranks)
        # augmented where the network runs: on a GPU the CPU would otherwise be the bottleneck
        images = augment(patches[rows[share]].to(device, non_blocking=True), normalisation, draw.take(share))
        batch_targets = targets[rows[share]].to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total_steps, warmup_steps, config.learning_rate)
        with autocast:
            loss = loss_function(model(images).float(), batch_targets) * (ranks.world / len(rows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double().cpu() * len(rows) / ranks.world
        step += 1
        progress(f"epoch {epoch}/{config.epochs}", number, len(batches))
    if ranks.world > 1:
        torch.distributed.all_reduce(total_loss)
    return float(total_loss) / len(order), step


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


def build_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network and AdamW, with no weight decay on biases and normalisation parameters."""
    torch.manual_seed(config.seed)
    model = create_model(config.architecture, **config.architecture_kwargs).to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    return model, optimizer


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
    out_dir = Path(out_dir)
    checkpoints = out_dir / CHECKPOINTS
    ranks, device = join_torchrun(config.device)
    if ranks.is_main:
        check_run_folder(out_dir, store_path)
    ranks.barrier()
    data = load_training_data(store_path, config, device)
    described = data.describe()
    if ranks.is_main:
        log(
            f"train: {len(described['train_patients'])} patients, {described['train_patches']:,} patches "
            f"({described['train_idc_patches']:,} IDC); val: {len(described['val_patients'])} patients, "
            f"{described['val_patches']:,} patches ({described['val_idc_patches']:,} IDC); device {device}"
            + (f", {ranks.world} ranks" if ranks.world > 1 else "")
        )
    model, optimizer = build_model(config, device)
    trained = model
    if ranks.world > 1:
        if device.type == "cuda":
            trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)

    state = load_state(checkpoints, config, model, optimizer, ranks) if resume else None
    if state is None:
        if (checkpoints / STATE_JSON).exists():
            raise RunExistsError(out_dir)
        ranks.barrier()  # every rank has looked before rank 0 writes the first checkpoint
        state = {
            "epoch": 0, "history": [], "best_epoch": None, "best_score": -1.0, "seconds": 0.0,
            "normalisation": asdict(Normalisation.of(data.train_patches.numpy(), seed=config.seed)),
        }
        if ranks.is_main:
            checkpoints.mkdir(parents=True, exist_ok=True)
    elif state["epoch"] >= config.epochs:
        log(f"resuming: all {config.epochs} epochs were done; finishing")
    else:
        log(f"resuming after epoch {state['epoch']}")
    normalisation = Normalisation(tuple(state["normalisation"]["mean"]), tuple(state["normalisation"]["std"]))

    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, _ = train_one_epoch(
            trained, optimizer, data.train_patches, data.train_labels, data.train_targets, normalisation, config, epoch,
            (epoch - 1) * steps_per_epoch, steps_per_epoch * config.epochs, device, progress if ranks.is_main else silent, ranks,
        )
        rng_states = gather_rng_states(ranks)
        if ranks.is_main:
            record = {"epoch": epoch, "train_loss": train_loss, "learning_rate": optimizer.param_groups[0]["lr"]}
            record.update(evaluate_logits(data.val.labels, batched_logits(model, data.val.pixels, normalisation, device=device)))
            record["seconds"] = time.perf_counter() - started
            state["history"].append(record)
            state["seconds"] += record["seconds"]
            state["epoch"] = epoch
            if record["val_best_balanced_accuracy"] > state["best_score"]:
                state["best_score"], state["best_epoch"] = record["val_best_balanced_accuracy"], epoch
                atomic_write_bytes(checkpoints / BEST_WEIGHTS, best_weights_bytes(model))
            save_state(checkpoints, config, model, optimizer, state, rng_states)
            atomic_write_text(out_dir / METRICS_LOG, "".join(json.dumps(r) + "\n" for r in state["history"]))
            log(
                f"epoch {epoch}/{config.epochs}: loss {train_loss:.4f}, val balanced accuracy {record['val_balanced_accuracy']:.4f} "
                f"(best threshold {record['val_best_balanced_accuracy']:.4f}), AUC {record['val_auc']:.4f}, {record['seconds']:.0f} s"
            )
        ranks.barrier()

    if ranks.is_main:
        result = finalise(model, normalisation, data, config, state, out_dir, device, command, log)
    ranks.barrier()
    if not ranks.is_main:  # the others read back what rank 0 wrote
        loaded, metadata = load_model(out_dir)
        result = TrainResult(out_dir / "model.safetensors", metadata, metadata.training["history"])
    return result


def finalise(model, normalisation, data: TrainingData, config: TrainConfig, state: dict, out_dir: Path,
             device: torch.device, command: str | None, log: Callable[[str], None]) -> TrainResult:
    """Keep the best epoch, fit its scoring on the val patients, save the model."""
    model.load_state_dict(read_safetensors(out_dir / CHECKPOINTS / BEST_WEIGHTS))
    scoring, validation = fit_scoring_on(model, normalisation, data.val, rule=config.threshold_rule, device=device)
    metadata = ModelMetadata(
        architecture=config.architecture,
        architecture_kwargs=config.architecture_kwargs,
        normalisation=normalisation,
        scoring=scoring,
        training={
            "config": asdict(config),
            "best_epoch": state["best_epoch"],
            "history": state["history"],
            **data.describe(),
            "seconds": round(state["seconds"], 1),
            "device": str(device),
            "machine": machine_description(device),
            "command": command,
            "torch": torch.__version__,
            "histoscreen": __version__,
            "flops_per_patch": count_flops(model.cpu()),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        validation=validation,
    )
    model_path = save_model(model.cpu(), metadata, out_dir / "model.safetensors")
    log(f"model: {model_path} (val: {_summary(validation.metrics['plain'])})")
    return TrainResult(model_path, metadata, state["history"])


def _summary(metrics: dict) -> str:
    return (
        f"accuracy {metrics['accuracy']:.4f}, sensitivity {metrics['sensitivity']:.4f}, "
        f"specificity {metrics['specificity']:.4f}, AUC {metrics['roc_auc']:.4f}"
    )
