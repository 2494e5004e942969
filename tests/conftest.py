"""Shared fixtures: synthetic slides in the Kaggle layout, and the real patches when present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from histoscreen.data import synthesize

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """A fresh ONNX graph cache for the session, never the user's: a graph that other code
    (a benchmark's mutant, an older version) left there must not decide a test."""
    os.environ["HISTOSCREEN_CACHE"] = config._histoscreen_cache = tempfile.mkdtemp(prefix="histoscreen-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_histoscreen_cache", ""), ignore_errors=True)


def shared_data_folder() -> Path | None:
    """../shared/data/idc beside the checkout (or HISTOSCREEN_SHARED_DATA), if it is there."""
    configured = os.environ.get("HISTOSCREEN_SHARED_DATA")
    folder = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data" / "idc"
    return folder if (folder / "unpack.py").is_file() else None


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory) -> Path:
    """Three synthetic slides laid out like the Kaggle archive: every patch twice."""
    root = tmp_path_factory.mktemp("archive") / "kaggle"
    synthesize(root, patients=3, seed=11, doubled=True)
    return root


@pytest.fixture(scope="session")
def real_val_patches() -> tuple[Path, Counter]:
    """The real official-val patches unpacked as PNG, and the (patient, label) counts in val.zip.

    CI unpacks them first and names the folder in HISTOSCREEN_REAL_VAL; otherwise they are
    unpacked here into .cache/ (unpack.py skips files already written).
    """
    shared = shared_data_folder()
    if shared is None:
        pytest.skip("real IDC patches not available: ../shared/data/idc is absent (users don't have it)")
    target = Path(os.environ.get("HISTOSCREEN_REAL_VAL") or REPO_ROOT / ".cache" / "real-idc" / "val")
    subprocess.run(
        [sys.executable, str(shared / "unpack.py"), str(target), "--split", "val"],
        check=True,
        capture_output=True,
    )
    with zipfile.ZipFile(shared / "val.zip") as archive:
        expected = Counter(tuple(member.split("/")[:2]) for member in archive.namelist() if member.endswith(".webp"))
    return target, expected


@pytest.fixture(scope="session")
def real_full_val_patches() -> Path:
    """Every real patch of the official val patients (val.zip and val_rest.zip together: the
    slides at full density, as the shipped model's scoring was fitted on), unpacked as PNG."""
    shared = shared_data_folder()
    if shared is None:
        pytest.skip("real IDC patches not available: ../shared/data/idc is absent (users don't have it)")
    target = REPO_ROOT / ".cache" / "real-idc" / "val-full"
    for split in ("val", "val-rest"):
        subprocess.run([sys.executable, str(shared / "unpack.py"), str(target), "--split", split], check=True, capture_output=True)
    return target


TINY_ARCHITECTURE = {"widths": [8, 16, 16, 24], "dropout": 0.0}


def tiny_config(**overrides):
    """A model small enough to train on synthetic slides in seconds: the held-out synthetic
    patients are the val fold of a 3-fold split."""
    from histoscreen.training import TrainConfig

    from histoscreen.data import SplitSpec

    settings = dict(
        architecture="compact", architecture_kwargs=TINY_ARCHITECTURE, epochs=3, batch_size=128,
        learning_rate=3e-3, split=SplitSpec("kfold", folds=3, fold=1), seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """Six synthetic slides, packed."""
    from histoscreen.data import prepare

    root = tmp_path_factory.mktemp("synthetic-store")
    synthesize(root / "slides", patients=6, seed=21)
    prepare(root / "slides", root / "store")
    return root / "store"


@pytest.fixture(scope="session")
def tiny_model(synthetic_store, tmp_path_factory) -> Path:
    """A tiny model trained for a few seconds on four synthetic patients."""
    from histoscreen.training import train

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    train(synthetic_store, out, tiny_config())
    return out


@pytest.fixture
def edited_tiny_model(tiny_model, tmp_path):
    """Make a copy of the tiny model whose metadata `edit(metadata_dict)` changes; returns its folder."""

    def make(edit) -> Path:
        model_dir = tmp_path / "edited-model"
        shutil.copytree(tiny_model, model_dir, ignore=shutil.ignore_patterns("checkpoints"))
        metadata = json.loads((model_dir / "model.json").read_text())
        edit(metadata)
        (model_dir / "model.json").write_text(json.dumps(metadata))
        return model_dir

    return make


def predict_to_csv(inputs, out, **options):
    """predict, then write the CSV (and rejects) as the CLI does; returns the Predictions."""
    from histoscreen.report import write_predictions
    from histoscreen.tasks import predict

    predictions = predict([str(i) for i in inputs], **options)
    write_predictions(predictions, out, overwrite=True)
    return predictions


def evaluate_to(store, out, **options):
    """evaluate, then write metrics.json, per_patient.csv and plots; returns the metrics.json payload."""
    from histoscreen.report import write_evaluation
    from histoscreen.tasks import evaluate

    evaluation = evaluate(store, **options)
    write_evaluation(evaluation, out)
    return evaluation.report()


def screen_to(inputs, out, **options):
    """Screen slides into a report folder, as the CLI does; returns the ScreeningReport."""
    from histoscreen.report import write_screening_report
    from histoscreen.tasks import Screening

    inputs = [inputs] if not isinstance(inputs, (list, tuple)) else inputs
    return write_screening_report(Screening(inputs, **options), out)


def wait_done(client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")
