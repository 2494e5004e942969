"""Checkpoints: a run's folder, and the state a killed run resumes from (model, optimizer and
random generators as safetensors; everything else as JSON, written last as the commit point)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from histoscreen.atomic import OUTPUT_MARK, atomic_write_bytes, atomic_write_text, guard_output
from histoscreen.errors import ResumeMismatchError, UnsafeOutputError
from histoscreen.models.bundle import read_safetensors
from histoscreen.training.config import TrainConfig
from histoscreen.training.ranks import Ranks

CHECKPOINTS = "checkpoints"
STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"
METRICS_LOG = "metrics.jsonl"
RUN_FILES = {CHECKPOINTS, METRICS_LOG, "model.safetensors", "model.json", OUTPUT_MARK}


def check_run_folder(out_dir: Path, store_path: str | os.PathLike) -> None:
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


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def save_state(checkpoints: Path, config: TrainConfig, model, optimizer, state: dict, rng_states: list[torch.Tensor]) -> None:
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
    atomic_write_bytes(checkpoints / tensor_file, safetensors_bytes(cpu_tensors(tensors)))
    payload = {**state, "tensors": tensor_file, "config": asdict(config), "param_groups": optimizer_state["param_groups"],
               "rng_python": random.getstate(), "rng_numpy": _numpy_rng_state()}
    atomic_write_text(checkpoints / STATE_JSON, json.dumps(payload, indent=1) + "\n")
    for older in checkpoints.glob("epoch-*.safetensors"):
        if older.name != tensor_file:
            older.unlink()


def _numpy_rng_state() -> list:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), position, has_gauss, cached]


def load_state(checkpoints: Path, config: TrainConfig, model, optimizer, ranks: Ranks) -> dict | None:
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


def best_weights_bytes(model: torch.nn.Module) -> bytes:
    return safetensors_bytes(cpu_tensors(model.state_dict()))
