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


# ---- inference on Ray ---------------------------------------------------------------------

ray = pytest.importorskip("ray", reason="the [distributed] extra (Ray) is not installed")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster with 2 CPUs for this module; the engine and the CLI join it."""
    started = not ray.is_initialized()
    if started:
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"] if started else ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def slides_with_a_corrupt_patch(tmp_path_factory) -> Path:
    from histoscreen.data import synthesize

    root = tmp_path_factory.mktemp("ray-slides") / "slides"
    synthesize(root, patients=4, seed=5)
    victim = sorted((root / "900001" / "1").glob("*.png"))[3]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    return root


def run_histoscreen(*arguments: str) -> None:
    result = subprocess.run([str(HISTOSCREEN), *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_predictions(local: Path, on_ray: Path) -> None:
    import pandas as pd

    a, b = pd.read_csv(local), pd.read_csv(on_ray)
    assert len(a) > 100
    pd.testing.assert_frame_equal(a.drop(columns="prob_idc"), b.drop(columns="prob_idc"))  # same rows, order, calls
    assert (a.prob_idc - b.prob_idc).abs().max() <= 1e-6


def test_ray_engine_writes_what_the_local_engine_writes(slides_with_a_corrupt_patch, ray_address, tmp_path):
    slides = str(slides_with_a_corrupt_patch)
    ray_options = ["--engine", "ray", "--ray-address", ray_address, "-q"]
    run_histoscreen("predict", slides, "--out", str(tmp_path / "local.csv"), "-q")
    run_histoscreen("predict", slides, "--out", str(tmp_path / "ray.csv"), *ray_options)
    assert_same_predictions(tmp_path / "local.csv", tmp_path / "ray.csv")
    rejects = (tmp_path / "local.rejects.csv").read_text()
    assert "broken" not in rejects and rejects.count("\n") == 2  # header and the corrupt patch
    assert (tmp_path / "ray.rejects.csv").read_text() == rejects

    run_histoscreen("screen", slides, "--out", str(tmp_path / "local"), "-q")
    run_histoscreen("screen", slides, "--out", str(tmp_path / "ray"), *ray_options)
    for name in ("slides.csv", "errors.csv"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text(), name
    for slide in ("900000", "900001", "900002", "900003"):
        assert_same_predictions(tmp_path / "local" / "slides" / slide / "patches.csv", tmp_path / "ray" / "slides" / slide / "patches.csv")
    assert len((tmp_path / "ray" / "errors.csv").read_text().splitlines()) == 2


def busy_ray_worker(method: str) -> int | None:
    """The pid of an actor process running `method` now (Ray titles it ray::ShardWorker.<method>)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(f"ray::ShardWorker.{method}".encode()):
                    return int(entry.name)
            except OSError:
                continue
    return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's worker processes in /proc")
def test_a_worker_killed_mid_shard_costs_a_retry_not_the_run(ray_address, tmp_path):
    from histoscreen.data import synthesize
    from histoscreen.tasks import RayEngine, Screening

    synthesize(tmp_path / "slides", patients=8, seed=9)
    options = dict(tta=True)  # eight views: each slide keeps a worker busy long enough to be killed
    local = list(Screening([tmp_path / "slides"], **options))
    screening = Screening([tmp_path / "slides"], engine=RayEngine(address=ray_address, workers=2), **options)
    killed, results = None, []
    for result in screening:
        results.append(result)
        deadline = time.monotonic() + 10
        while killed is None and time.monotonic() < deadline:
            if (pid := busy_ray_worker("screen")) is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.005)
    assert killed is not None, "no worker was caught mid-shard"
    assert screening.problems == []
    assert [r.patient for r in results] == [r.patient for r in local] == [str(900000 + i) for i in range(8)]
    for mine, theirs in zip(results, local):
        assert abs(mine.probabilities - theirs.probabilities).max() <= 1e-6
        assert mine.summary == theirs.summary


@pytest.mark.real_data
def test_ray_engine_on_real_val_patients(real_val_patches, ray_address, tmp_path):
    folder, _ = real_val_patches
    patients = sorted(p for p in folder.iterdir() if p.is_dir())[:6]
    inputs = [str(p) for p in patients]
    run_histoscreen("predict", *inputs, "--out", str(tmp_path / "local.csv"), "-q")
    run_histoscreen("predict", *inputs, "--out", str(tmp_path / "ray.csv"), "--engine", "ray", "--ray-address", ray_address, "-q")
    assert_same_predictions(tmp_path / "local.csv", tmp_path / "ray.csv")


def test_ray_engine_screens_whole_slide_images_like_the_local_engine(ray_address, tmp_path):
    pytest.importorskip("openslide", reason="the [wsi] extra is not installed")
    pytest.importorskip("tifffile", reason="tifffile writes the test slides")
    from histoscreen.data import open_sources, synthesize
    from histoscreen.tasks import RayEngine, Screening
    from slide_files import stitch, upscale, write_pyramid_tiff

    synthesize(tmp_path / "patches", patients=2, seed=4)
    files = []
    for patient in ("900000", "900001"):
        [source] = open_sources([tmp_path / "patches" / patient])
        files.append(write_pyramid_tiff(tmp_path / f"slide-{patient}.tif", upscale(stitch(source.read_all()), 2), 2.0,
                                        compression="zlib"))
    local = list(Screening(files))
    on_ray = Screening(files, engine=RayEngine(address=ray_address))
    assert [r.patient for r in on_ray] == [r.patient for r in local] == ["slide-900000", "slide-900001"]
    for mine, theirs in zip(on_ray, local):  # iterating again screens again
        assert len(mine.probabilities) > 100 and abs(mine.probabilities - theirs.probabilities).max() <= 1e-6
        assert mine.summary == theirs.summary and mine.reading == theirs.reading


def histoscreen_fails(*arguments: str) -> tuple[list[str], float]:
    started = time.monotonic()
    result = subprocess.run([str(HISTOSCREEN), *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    return result.stderr.strip().splitlines(), time.monotonic() - started


def test_a_cluster_that_is_not_there_fails_at_once_in_one_line(slides_with_a_corrupt_patch, tmp_path):
    lines, seconds = histoscreen_fails("predict", str(slides_with_a_corrupt_patch), "--out", str(tmp_path / "p.csv"),
                                       "--engine", "ray", "--ray-address", "127.0.0.1:1", "-q")
    assert len(lines) == 1 and "cannot join 127.0.0.1:1: nothing answers there" in lines[0], lines
    assert seconds < 30
    assert not (tmp_path / "p.csv").exists()


def test_workers_the_cluster_cannot_place_are_refused_not_waited_for(slides_with_a_corrupt_patch, ray_address, tmp_path):
    slides, out = str(slides_with_a_corrupt_patch), str(tmp_path / "p.csv")
    on_ray = ["--engine", "ray", "--ray-address", ray_address, "-q"]
    lines, seconds = histoscreen_fails("predict", slides, "--out", out, *on_ray, "--ray-workers", "3")
    assert len(lines) == 1 and "--ray-workers is 3 workers of 1 CPUs, 3 in all, but the cluster has 2" in lines[0], lines
    lines, _ = histoscreen_fails("screen", slides, "--out", str(tmp_path / "r"), *on_ray, "--ray-cpus-per-worker", "4")
    assert len(lines) == 1 and "--ray-cpus-per-worker is 4, but the largest node of the cluster has 2 CPUs" in lines[0], lines
    assert seconds < 120 and not Path(out).exists()
