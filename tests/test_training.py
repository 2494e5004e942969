"""Training on synthetic slides: it learns, it checkpoints, and a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from histoscreen import HistoscreenError
from histoscreen.data import SplitSpec
from conftest import evaluate_to
from histoscreen.models import load_model
from histoscreen.training import learning_rate_at, train

from conftest import TINY_ARCHITECTURE, tiny_config


def test_a_tiny_model_beats_chance_on_held_out_synthetic_patients(tiny_model, synthetic_store, tmp_path):
    report = evaluate_to(
        synthetic_store, tmp_path / "eval", model=tiny_model, split="val",
        split_spec=SplitSpec("kfold", folds=3, fold=1, seed=0), bootstrap_rounds=50,
    )
    held_out = report["metrics"]
    assert report["measured_on"]["patients"] == 2
    assert held_out["balanced_accuracy"] > 0.8, held_out
    assert held_out["roc_auc"] > 0.9, held_out
    assert {"roc.png", "pr.png", "confusion.png", "calibration.png", "training_curves.png"} <= set(os.listdir(tmp_path / "eval"))
    per_patient = (tmp_path / "eval" / "per_patient.csv").read_text().splitlines()
    assert len(per_patient) == 3


def test_model_metadata_records_training_and_calibration(tiny_model):
    _, metadata = load_model(tiny_model)
    assert metadata.architecture == "compact" and metadata.architecture_kwargs == TINY_ARCHITECTURE
    assert len(metadata.training["history"]) == 3
    assert metadata.training["best_epoch"] in (1, 2, 3)
    assert not set(metadata.training["train_patients"]) & set(metadata.training["val_patients"])
    assert 0 < metadata.scoring.plain.threshold < 1 and metadata.scoring.plain.temperature > 0
    assert metadata.validation.metrics["plain"]["patches"] == metadata.training["val_patches"]
    lines = (tiny_model / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate_at(step, 100, 10, 1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.01


def test_the_split_seed_chooses_the_folds_apart_from_the_training_seed(synthetic_store, tmp_path):
    from histoscreen.data import PatchStore, kfold_splits

    table = PatchStore(synthetic_store).patient_table()
    folds = {seed: kfold_splits(table, 3, seed=seed)[0].val for seed in (0, 1, 2)}
    seed = next(s for s in (1, 2) if folds[s] != folds[0])  # a fold assignment that differs from seed 0's
    result = train(synthetic_store, tmp_path / "model", tiny_config(epochs=1, split=SplitSpec("kfold", folds=3, fold=1, seed=seed)))
    assert set(result.metadata.training["val_patients"]) == folds[seed]
    assert result.metadata.training["config"]["seed"] == 0


def test_killed_run_resumes_to_the_same_result(synthetic_store, tmp_path):
    epochs = 4

    def command_into(out):
        # Both runs in fresh processes on one thread: bit-identity then rests on the saved
        # state alone, not on how the pytest process's earlier tests left torch's threads.
        return [
            sys.executable, "-m", "histoscreen.cli", "train", str(synthetic_store), "--out", str(out),
            "--arch-kwargs", json.dumps(TINY_ARCHITECTURE), "--epochs", str(epochs), "--batch-size", "128",
            "--lr", "0.003", "--split-scheme", "kfold", "--folds", "3", "--fold", "1", "--threads", "1", "--quiet",
        ]

    finished = subprocess.run(command_into(tmp_path / "straight"), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    _, straight_metadata = load_model(tmp_path / "straight")

    out = tmp_path / "killed"
    command = command_into(out)
    process = subprocess.Popen(command)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = len(log.read_text().splitlines())
    assert 1 <= done_before_kill < epochs
    assert not (out / "model.safetensors").exists()

    with pytest.raises(HistoscreenError, match="holds a training run already"):
        train(synthetic_store, out, tiny_config(epochs=epochs))
    with pytest.raises(HistoscreenError, match="changed: learning_rate"):
        train(synthetic_store, out, tiny_config(epochs=epochs, learning_rate=0.01), resume=True)

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    history = [json.loads(line) for line in log.read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    model, metadata = load_model(out)
    straight_weights, resumed_weights = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)  # bit for bit
    for resumed_epoch, straight_epoch in zip(history, straight_metadata.training["history"]):
        assert resumed_epoch["val_loss"] == straight_epoch["val_loss"]  # every generator restored: the same run
    assert metadata.scoring == straight_metadata.scoring


def test_distillation_trains_on_the_teachers_probabilities_mixed_with_the_labels(tiny_model, synthetic_store, tmp_path):
    from histoscreen.runtime.forward import batched_logits
    from histoscreen.scoring.metrics import sigmoid
    from histoscreen.training import load_training_data

    # a second teacher that says twice as much (its last layer doubled): the mean logit is 1.5 times the first's
    import shutil

    from safetensors.torch import load_file, save_file

    louder = tmp_path / "louder"
    shutil.copytree(tiny_model, louder, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = load_file(louder / "model.safetensors")
    last = [name for name, tensor in tensors.items() if tensor.ndim == 2][-1]
    tensors[last] *= 2
    tensors[last.removesuffix("weight") + "bias"] *= 2
    save_file(tensors, louder / "model.safetensors")
    config = tiny_config(teachers=[str(tiny_model), str(louder)], distil_weight=0.25)
    data = load_training_data(synthetic_store, config)
    model, metadata = load_model(tiny_model)
    taught = sigmoid(1.5 * batched_logits(model, data.train_patches.numpy(), metadata.normalisation, tta=True))
    expected = 0.75 * data.train_labels.double().numpy() + 0.25 * taught
    assert torch.allclose(data.train_targets.double(), torch.as_tensor(expected), atol=1e-6)
    assert 0 < data.train_targets.min() and data.train_targets.max() < 1  # soft everywhere

    result = train(synthetic_store, tmp_path / "student", tiny_config(epochs=1, teachers=[str(tiny_model)], distil_weight=0.5))
    assert result.metadata.training["config"]["teachers"] == [str(tiny_model)]


def test_distillation_settings_are_checked_before_any_work(synthetic_store, tmp_path):
    with pytest.raises(HistoscreenError, match="distil_weight"):
        tiny_config(teachers=["somewhere"], distil_weight=0.0)
    with pytest.raises(HistoscreenError, match="distil_weight"):
        tiny_config(distil_weight=0.5)
    with pytest.raises(HistoscreenError, match="distil_weight"):
        tiny_config(teachers=["somewhere"], distil_weight=1.5)
    missing = tmp_path / "no-such-model"
    with pytest.raises(HistoscreenError, match="no-such-model"):
        train(synthetic_store, tmp_path / "student", tiny_config(epochs=1, teachers=[str(missing)], distil_weight=0.5))
