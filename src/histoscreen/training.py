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
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from histoscreen import __version__
from histoscreen.atomic import OUTPUT_MARK, atomic_write_bytes, atomic_write_text, guard_output
from histoscreen.data.naming import patient_sort_key
from histoscreen.data.grid import SlidePositions
from histoscreen.data.sources import PatchBatch, StoreSource
from histoscreen.data.splits import PatientSplit, SplitSpec
from histoscreen.data.store import PatchStore
from histoscreen.data.transforms import AugmentationDraw, Normalisation, augment
from histoscreen.errors import InputError, ResumeMismatchError, RunExistsError, SettingError, UnsafeOutputError
from histoscreen.models import count_flops, create_model
from histoscreen.models.bundle import ModelMetadata, load_model, read_safetensors, save_model
from histoscreen.models.registry import check_architecture_kwargs
from histoscreen.progress import Progress, silent
from histoscreen.runtime.device import machine_description, pick_device
from histoscreen.runtime.forward import batched_logits, fit_scoring_on
from histoscreen.scoring.calibration import ThresholdRule, choose_threshold
from histoscreen.scoring.context import neighbour_means
from histoscreen.scoring.metrics import classification_metrics, sigmoid

CHECKPOINTS = "checkpoints"
STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"
METRICS_LOG = "metrics.jsonl"
RUN_FILES = {CHECKPOINTS, METRICS_LOG, "model.safetensors", "model.json", OUTPUT_MARK}
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
    # IDC regions were outlined at low magnification, so labels near a region's border are
    # the least sure: train on (1 - s) * label + s * (mean label of the 8 neighbours).
    # Targets only, never inputs; 0 trains on the labels as they are.
    border_smoothing: float = 0.0
    # Distillation: train on (1 - w) * target + w * the teachers' probability, the sigmoid of
    # their mean logit over the 8 dihedral views (an ensemble taught to one CPU-fast network).
    teachers: list[str] = field(default_factory=list)
    distil_weight: float = 0.0
    seed: int = 0
    split: SplitSpec = field(default_factory=SplitSpec)
    threshold_rule: ThresholdRule = field(default_factory=ThresholdRule)
    max_train_patches: int | None = None  # a seeded subsample, for quick runs
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):  # a config read back from JSON
            self.split = SplitSpec(**self.split)
        if isinstance(self.threshold_rule, dict):
            self.threshold_rule = ThresholdRule(**self.threshold_rule)
        if self.balance not in BALANCE_CHOICES:
            raise SettingError("balance", f"must be one of {', '.join(BALANCE_CHOICES)}, got {self.balance!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.border_smoothing <= 1:
            raise SettingError("border_smoothing", f"must be between 0 and 1, got {self.border_smoothing}")
        for name in ("learning_rate", "weight_decay", "warmup_epochs", "stain_jitter"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                raise SettingError(name, f"must be a {'positive' if name == 'learning_rate' else 'non-negative'} number, got {value}")
        if not 0 <= self.distil_weight <= 1:
            raise SettingError("distil_weight", f"must be between 0 and 1, got {self.distil_weight}")
        if bool(self.teachers) != (self.distil_weight > 0):
            raise SettingError("distil_weight", "distillation needs both teacher models and a weight above 0")
        if self.max_train_patches is not None and self.max_train_patches < 1:
            raise SettingError("max_train_patches", f"must be at least 1, got {self.max_train_patches}")
        if not isinstance(self.architecture_kwargs, dict):
            raise SettingError("architecture_kwargs", f"must be an object of options, got {self.architecture_kwargs!r}")
        check_architecture_kwargs(self.architecture_kwargs)


@dataclass
class TrainResult:
    model_path: Path
    metadata: ModelMetadata
    history: list[dict]


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


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job: rank `rank` of `world` (1 without torchrun).

    Every rank trains on its share of each global batch; rank 0 alone validates and writes
    checkpoints, metrics.jsonl and the model."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def join_torchrun(requested_device: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), pick_device(requested_device)
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


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
        share = _share(len(rows), ranks)
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


def _share(count: int, ranks: Ranks) -> slice:
    """This rank's contiguous part of a batch of `count` (the whole batch when alone)."""
    base, extra = divmod(count, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))


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
        _check_run_folder(out_dir, store_path)
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

    state = _load_state(checkpoints, config, model, optimizer, ranks) if resume else None
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
        rng_states = _gather_rng_states(ranks)
        if ranks.is_main:
            record = {"epoch": epoch, "train_loss": train_loss, "learning_rate": optimizer.param_groups[0]["lr"]}
            record.update(evaluate_logits(data.val.labels, batched_logits(model, data.val.pixels, normalisation, device=device)))
            record["seconds"] = time.perf_counter() - started
            state["history"].append(record)
            state["seconds"] += record["seconds"]
            state["epoch"] = epoch
            if record["val_best_balanced_accuracy"] > state["best_score"]:
                state["best_score"], state["best_epoch"] = record["val_best_balanced_accuracy"], epoch
                atomic_write_bytes(checkpoints / BEST_WEIGHTS, safetensors_bytes(_cpu_tensors(model.state_dict())))
            _save_state(checkpoints, config, model, optimizer, state, rng_states)
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


def _gather_rng_states(ranks: Ranks) -> list[torch.Tensor]:
    """Every rank's torch generator state (dropout draws differ between ranks), for rank 0 to save."""
    state = torch.get_rng_state()
    if ranks.world == 1:
        return [state]
    gathered: list = [None] * ranks.world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _check_run_folder(out_dir: Path, store_path: str | os.PathLike) -> None:
    """A run writes into a new folder or one holding a run of its own, never among other files."""
    guard_output(out_dir, [store_path])
    if out_dir.is_dir():
        strangers = sorted(p.name for p in out_dir.iterdir() if p.name not in RUN_FILES)
        if strangers:
            raise UnsafeOutputError(
                f"{out_dir} holds files that are not a training run ({', '.join(strangers[:3])}); "
                "training writes into a new folder or resumes its own"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUTPUT_MARK).write_text(json.dumps({"written_by": "histoscreen", "kind": "training run"}) + "\n")


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


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def _save_state(checkpoints: Path, config: TrainConfig, model, optimizer, state: dict, rng_states: list[torch.Tensor]) -> None:
    """Model and optimizer tensors as safetensors, everything else as JSON.

    The tensors go to a file named for the epoch and the JSON, written last, names it:
    the JSON is the commit point, so a kill at any moment leaves a consistent pair.
    """
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    # Dropout draws from torch's global generator: without its state a resumed run would
    # not be the run that was killed.
    for rank, rng_state in enumerate(rng_states):
        tensors[f"rng.torch.{rank}"] = rng_state
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensor_file = f"epoch-{state['epoch']:03d}.safetensors"
    atomic_write_bytes(checkpoints / tensor_file, safetensors_bytes(_cpu_tensors(tensors)))
    payload = {**state, "tensors": tensor_file, "config": asdict(config), "param_groups": optimizer_state["param_groups"],
               "rng_python": random.getstate(), "rng_numpy": _numpy_rng_state()}
    atomic_write_text(checkpoints / STATE_JSON, json.dumps(payload, indent=1) + "\n")
    for older in checkpoints.glob("epoch-*.safetensors"):
        if older.name != tensor_file:
            older.unlink()


def _numpy_rng_state() -> list:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), position, has_gauss, cached]


def _load_state(checkpoints: Path, config: TrainConfig, model, optimizer, ranks: Ranks) -> dict | None:
    if not (checkpoints / STATE_JSON).is_file():
        return None
    state = json.loads((checkpoints / STATE_JSON).read_text())
    saved_config = state.pop("config")
    if saved_config != asdict(config):
        changed = sorted(k for k in saved_config if saved_config[k] != asdict(config).get(k))
        raise ResumeMismatchError(f"{checkpoints}: resuming needs the same settings as the killed run; changed: {', '.join(changed)}")
    tensors = read_safetensors(checkpoints / state.pop("tensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    version, internal, gauss = state.pop("rng_python")
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state.pop("rng_numpy")
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if f"rng.torch.{ranks.rank}" not in tensors:
        raise ResumeMismatchError(f"{checkpoints}: the killed run had fewer ranks than {ranks.world}; resume it with as many")
    torch.set_rng_state(tensors[f"rng.torch.{ranks.rank}"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
