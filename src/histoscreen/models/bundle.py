"""A model bundle: safetensors weights plus JSON metadata, saved and loaded. Never pickle.

A model is two files side by side: NAME.safetensors (tensors only, no code) and NAME.json
(architecture, normalisation, the scoring fitted on val patients, provenance). Every
field of the JSON is checked on load: a NaN or negative temperature, a threshold outside
(0, 1) or a zero standard deviation would silently turn every call, so such a file is
refused with one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from histoscreen.atomic import atomic_write_bytes, atomic_write_text, check_output_file
from histoscreen.constants import KAGGLE_UM_PER_PX
from histoscreen.data.views import Normalisation
from histoscreen.errors import HistoscreenError, ModelError
from histoscreen.jsontext import read_json_text
from histoscreen.models.registry import create_model
from histoscreen.scoring.settings import SCORING_MODES, Scoring, Validation, finite_number

if TYPE_CHECKING:
    import torch

WEIGHTS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
DEFAULT_WEIGHTS_NAME = f"model{WEIGHTS_SUFFIX}"  # of a model given as a folder
MODEL_FORMAT = "histoscreen-model"
MODEL_FORMAT_VERSION = 2
SHIPPED_MODEL_NAME = "idc-residual"


@dataclass
class ModelMetadata:
    architecture: str
    architecture_kwargs: dict
    normalisation: Normalisation
    scoring: Scoring = Scoring()
    class_names: tuple[str, str] = ("non-IDC", "IDC")
    spacing_um_px: float = KAGGLE_UM_PER_PX  # the pixel size the model was trained at
    training: dict = field(default_factory=dict)  # provenance: config, history, data, command, machine
    validation: Validation | None = None

    def to_json(self) -> str:
        payload = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "architecture": self.architecture,
            "architecture_kwargs": self.architecture_kwargs,
            "normalisation": asdict(self.normalisation),
            "scoring": self.scoring.to_dict(),
            "class_names": list(self.class_names),
            "spacing_um_px": self.spacing_um_px,
            "training": self.training,
            "validation": self.validation.to_dict() if self.validation else None,
        }
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> ModelMetadata:
        payload = read_json_text(text, source, error=ModelError, what="model metadata")
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise ModelError(f"{source}: not histoscreen model metadata (no format {MODEL_FORMAT!r})")
        version = payload.get("format_version", 1)
        if version not in (1, MODEL_FORMAT_VERSION):
            raise ModelError(f"{source}: model format version {version!r} is newer than this histoscreen reads ({MODEL_FORMAT_VERSION})")
        try:
            if version == 1:
                payload = _from_version_1(payload)
            return cls._checked(payload)
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise ModelError(f"{source}: invalid model metadata: {detail}") from None

    @classmethod
    def _checked(cls, payload: dict) -> ModelMetadata:
        architecture, kwargs = payload["architecture"], payload.get("architecture_kwargs", {})
        if not isinstance(architecture, str) or not isinstance(kwargs, dict):
            raise ValueError("architecture must be a name and architecture_kwargs an object")
        normalisation = payload["normalisation"]
        mean = [finite_number("normalisation.mean", v, 1e3) for v in normalisation["mean"]]
        std = [finite_number("normalisation.std", v, 1e3) for v in normalisation["std"]]
        if len(mean) != 3 or len(std) != 3 or min(std) < 1e-6:
            raise ValueError(f"normalisation needs 3 means and 3 positive standard deviations, got {mean} and {std}")
        class_names = payload.get("class_names", list(cls.class_names))
        if not isinstance(class_names, list) or len(class_names) != 2 or not all(isinstance(n, str) and n for n in class_names):
            raise ValueError(f"class_names must be two names, got {class_names!r}")
        spacing = finite_number("spacing_um_px", payload.get("spacing_um_px", KAGGLE_UM_PER_PX))
        if spacing <= 0:
            raise ValueError(f"spacing_um_px must be positive, got {spacing}")
        training = payload.get("training") or {}
        if not isinstance(training, dict):
            raise ValueError("training must be an object")
        validation = payload.get("validation")
        return cls(
            architecture=architecture,
            architecture_kwargs=kwargs,
            normalisation=Normalisation(tuple(mean), tuple(std)),
            scoring=Scoring.from_dict(payload.get("scoring", {})),
            class_names=tuple(class_names),
            spacing_um_px=spacing,
            training=training,
            validation=Validation.from_dict(validation) if validation else None,
        )


def _from_version_1(payload: dict) -> dict:
    """Wave-1 metadata kept calibration in flat fields and free-form dicts."""
    def calibration(prefix: str, source: dict) -> dict:
        return {name: source.get(f"{prefix}{name}", default) for name, default in (("temperature", 1.0), ("bias", 0.0), ("threshold", 0.5))}

    scoring = {"plain": calibration("", payload), "tta": calibration("tta_", payload)}
    context = payload.get("context") or {}
    if context:
        scoring["context"] = {"radius": context["radius"], "weight": context["weight"]}
        scoring["context_plain"] = calibration("", context)
        scoring["context_tta"] = calibration("tta_", context)
    old = payload.get("validation") or {}
    validation = None
    if old:
        validation = {
            "threshold_rule": old.get("threshold_rule", "max balanced accuracy"),
            "metrics": {mode: old[mode] for mode in SCORING_MODES if mode in old},
            "leave_one_patient_out": {
                mode: old[f"leave_one_patient_out_{mode}"] for mode in ("plain", "tta") if f"leave_one_patient_out_{mode}" in old
            },
            "split": old.get("split"),
            "patients": old.get("patients", ()),
            "store": old.get("store"),
        }
    return {
        "architecture": payload["architecture"],
        "architecture_kwargs": payload.get("architecture_kwargs", {}),
        "normalisation": payload["normalisation"],
        "scoring": scoring,
        "class_names": payload.get("class_names", ["non-IDC", "IDC"]),
        "training": payload.get("training", {}),
        "validation": validation,
    }


def shipped_model_path() -> Path:
    """The model trained on the real official-train patients that ships with the package."""
    return Path(str(resources.files("histoscreen.models") / "shipped" / f"{SHIPPED_MODEL_NAME}{WEIGHTS_SUFFIX}"))


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) for a model given as a folder, its weights file or its .json."""
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_WEIGHTS_NAME
    if path.suffix == METADATA_SUFFIX:
        return path.with_suffix(WEIGHTS_SUFFIX), path
    return path, path.with_suffix(METADATA_SUFFIX)


def save_model(
    model: torch.nn.Module, metadata: ModelMetadata, path: str | os.PathLike, *, overwrite: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write NAME.safetensors and NAME.json; never over one of `inputs` (the model it was
    made from, say), nor over an existing model unless `overwrite`."""
    from safetensors.torch import save

    weights, meta = model_paths(path)
    for existing in (weights, meta):
        check_output_file(existing, overwrite=overwrite, inputs=inputs)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(weights, save(tensors, metadata={"format": MODEL_FORMAT}), replace=overwrite)
    atomic_write_text(meta, metadata.to_json(), replace=overwrite)
    return weights


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file, refusing anything else (pickles included)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_file(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"{path}: unreadable safetensors file ({error})") from None


def check_safetensors_file(path: Path) -> None:
    """Refuse a missing file or one that is not safetensors (a pickle above all) by its first
    bytes, before anything reads it further."""
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte header length, then the JSON header itself.
    if len(head) < 9 or head[8:9] != b"{":
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise ModelError(
                f"{path}: this is a pickled PyTorch file (.pt/.pth); histoscreen never unpickles model files, "
                "as unpickling can run arbitrary code. Convert it to safetensors with metadata JSON."
            )
        raise ModelError(f"{path}: not a safetensors file")


def model_digests(path: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of a model's weights file and of its scoring (the canonical JSON of the fitted
    calibrations, context and thresholds): what a published figure was measured with."""
    scoring = json.dumps(load_metadata(path).scoring.to_dict(), sort_keys=True, separators=(",", ":"))
    return {"weights": file_sha256(model_paths(path)[0]), "scoring": hashlib.sha256(scoring.encode()).hexdigest()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def figures_stamp(path: str | os.PathLike) -> str:
    """The line a page of figures of this model carries (tests check it against the shipped model)."""
    digests = model_digests(path)
    return (f"Figures measured with the shipped model: weights sha256 `{digests['weights'][:12]}`, "
            f"scoring sha256 `{digests['scoring'][:12]}`.")


def load_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The JSON half of a model, checked, without touching its weights."""
    weights, meta = model_paths(path)
    if not meta.is_file():
        raise ModelError(f"{weights}: its metadata {meta.name} is missing beside it")
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"{meta}: unreadable model metadata ({error})") from None
    return ModelMetadata.from_json(text, meta)


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelMetadata]:
    """Build the architecture named in the metadata and fill it with the saved weights (eval mode)."""
    weights, _ = model_paths(path)
    tensors = read_safetensors(weights)
    metadata = load_metadata(path)
    try:
        model = create_model(metadata.architecture, **metadata.architecture_kwargs)
    except HistoscreenError as error:
        raise ModelError(f"{weights}: {error}") from None
    except (TypeError, ValueError) as error:
        raise ModelError(f"{weights}: architecture_kwargs do not fit {metadata.architecture} ({error})") from None
    _check_tensors(weights, tensors, model.state_dict(), metadata.architecture)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ModelError(f"{weights}: weights do not fit {metadata.architecture} ({first})") from None
    return model.eval(), metadata


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], architecture: str) -> None:
    """Names, shapes, kinds of number and finiteness, before any is used: load_state_dict
    casts int64 weights to float without a word, and a NaN weight makes every call 'non-IDC'."""
    import torch

    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        described = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""
        ) if part)
        raise ModelError(f"{path}: weights do not fit {architecture} ({described})")
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise ModelError(f"{path}: weights do not fit {architecture} (tensor {name} has shape {list(tensor.shape)}, needs {list(want.shape)})")
        if tensor.is_floating_point() != want.is_floating_point():
            raise ModelError(f"{path}: tensor {name} holds {tensor.dtype}, {architecture} needs {want.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: tensor {name} holds NaN or infinite values")
