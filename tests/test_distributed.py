"""Scale-out: training with torchrun (DistributedDataParallel, gloo on the CPU) gives what one
process gives; rank 0 alone writes; a killed job resumes. Screening and prediction on a
local Ray cluster give what the local engine gives, also when a worker is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_ARCHITECTURE

TORCHRUN = Path(sys.executable).parent / "torchrun"
HISTOSCREEN = Path(sys.executable).parent / "histoscreen"
TRAIN = ["--arch-kwargs", json.dumps(TINY_ARCHITECTURE), "--batch-size", "128", "--lr", "0.003",
         "--split-scheme", "kfold", "--folds", "3", "--fold", "1", "--threads", "1", "-q"]


def history(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(store: Path, out: Path, epochs: int, *extra: str, wait: bool = True):
    options = [o for o in TRAIN if o != "-q"]  # rank 0 reports, the others are quiet by themselves
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(HISTOSCREEN), "train", str(store),
               "--out", str(out), "--epochs", str(epochs), *options, *extra]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not beside this Python")
def test_two_ranks_train_like_one_process_and_only_rank_0_writes(synthetic_store, tmp_path):
    from histoscreen.models import load_model

    single = subprocess.run([str(HISTOSCREEN), "train", str(synthetic_store), "--out", str(tmp_path / "one"), "--epochs", "3", *TRAIN],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    result = torchrun(synthetic_store, tmp_path / "two", 3)
    assert result.stdout.count("model: ") == 1  # rank 0 alone reports
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [h["epoch"] for h in two] == [1, 2, 3]
    for a, b in zip(one, two):
        # the same global batches and augmentations; only BatchNorm statistics (per rank on
        # the CPU, where SyncBatchNorm does not run) and dropout draws differ
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.03)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.1)
        assert b["val_auc"] == pytest.approx(a["val_auc"], abs=0.02)
    _, metadata = load_model(tmp_path / "two")
    assert metadata.training["history"] == two
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == [".histoscreen-output", "checkpoints", "metrics.jsonl", "model.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["best.safetensors", "epoch-003.safetensors", "state.json"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not beside this Python")
def test_a_killed_torchrun_job_resumes_to_the_same_result(synthetic_store, tmp_path):
    straight = tmp_path / "straight"
    torchrun(synthetic_store, straight, 4)
    killed = tmp_path / "killed"
    job = torchrun(synthetic_store, killed, 4, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().strip()):
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # every rank and the launcher
    job.wait()
    assert 1 <= len(history(killed)) < 4 and not (killed / "model.safetensors").exists()
    torchrun(synthetic_store, killed, 4, "--resume")
    assert [h["epoch"] for h in history(killed)] == [1, 2, 3, 4]
    for resumed, uninterrupted in zip(history(killed), history(straight)):
        assert resumed["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-6)
    shutil.rmtree(tmp_path)
