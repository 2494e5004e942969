"""Saving and loading models as safetensors weights plus JSON metadata. Never pickle.

A model is two files side by side: NAME.safetensors (tensors only, no code) and
NAME.json (architecture, normalisation, threshold, temperature, provenance).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from histoscreen import HistoscreenError
from histoscreen.atomic import atomic_write_bytes, atomic_write_text
from histoscreen.data.transforms import Normalisation
from histoscreen.models.registry import create_model

WEIGHTS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
MODEL_FORMAT = "histoscreen-model"


@dataclass
class ModelMetadata:
    architecture: str
    architecture_kwargs: dict
    normalisation: Normalisation
    # prob_idc = sigmoid(logit / temperature + bias); IDC when prob_idc >= threshold.
    # Separate values for dihedral test-time augmentation, fitted on the same val patients.
    threshold: float = 0.5
    temperature: float = 1.0
    bias: float = 0.0
    tta_threshold: float = 0.5
    tta_temperature: float = 1.0
    tta_bias: float = 0.0
    # Slide context (models/context.py), fitted on the same val patients: radius, weight,
    # and temperature, bias and threshold for the blended logit (tta_* for TTA). Empty when
    # the model was calibrated without patch positions.
    context: dict = field(default_factory=dict)
    class_names: tuple[str, str] = ("non-IDC", "IDC")
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)

    def to_json(self) -> str:
        payload = {"format": MODEL_FORMAT, **asdict(self)}
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> ModelMetadata:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise HistoscreenError(f"{source}: model metadata is not valid JSON ({error})") from None
        if payload.pop("format", None) != MODEL_FORMAT:
            raise HistoscreenError(f"{source}: not histoscreen model metadata (no format {MODEL_FORMAT!r})")
        try:
            normalisation = payload.pop("normalisation")
            payload["normalisation"] = Normalisation(tuple(normalisation["mean"]), tuple(normalisation["std"]))
            payload["class_names"] = tuple(payload.get("class_names", cls.class_names))
            return cls(**payload)
        except (KeyError, TypeError) as error:
            raise HistoscreenError(f"{source}: incomplete model metadata ({error})") from None


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) for a model given as a folder, its weights file or its .json."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == METADATA_SUFFIX:
        return path.with_suffix(WEIGHTS_SUFFIX), path
    return path, path.with_suffix(METADATA_SUFFIX)


def save_model(model: torch.nn.Module, metadata: ModelMetadata, path: str | os.PathLike) -> Path:
    weights, meta = model_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(weights, save(tensors, metadata={"format": MODEL_FORMAT}))
    atomic_write_text(meta, metadata.to_json())
    return weights


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file, refusing anything else (pickles included)."""
    if not path.is_file():
        raise HistoscreenError(f"{path}: no such model file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte header length, then the JSON header itself.
    if len(head) < 9 or head[8:9] != b"{":
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise HistoscreenError(
                f"{path}: this is a pickled PyTorch file (.pt/.pth); histoscreen never unpickles model files, "
                "as unpickling can run arbitrary code. Convert it to safetensors with metadata JSON."
            )
        raise HistoscreenError(f"{path}: not a safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise HistoscreenError(f"{path}: unreadable safetensors file ({error})") from None


def load_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The JSON half of a model, without touching its weights."""
    weights, meta = model_paths(path)
    if not meta.is_file():
        raise HistoscreenError(f"{weights}: its metadata {meta.name} is missing beside it")
    return ModelMetadata.from_json(meta.read_text(), meta)


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelMetadata]:
    """Build the architecture named in the metadata and fill it with the saved weights (eval mode)."""
    weights, _ = model_paths(path)
    tensors = read_safetensors(weights)
    metadata = load_metadata(path)
    model = create_model(metadata.architecture, **metadata.architecture_kwargs)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise HistoscreenError(f"{weights}: weights do not fit {metadata.architecture} ({first})") from None
    return model.eval(), metadata
