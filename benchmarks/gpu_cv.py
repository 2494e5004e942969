#!/usr/bin/env python3
"""The CV's fold networks and the shipped network, trained side by side on one GPU within a time limit.

usage: python benchmarks/gpu_cv.py --chunks DIR --out DIR [--minutes 8.5] [--parallel 8]
       python benchmarks/gpu_cv.py --tiny --out DIR     (tests the script on the CPU here)

On a lent GPU machine (see benchmarks/gpu_data.py for how the real patches get there): rebuilds
the store of all 143 patients from the carried chunks, then runs `histoscreen train` jobs,
several at once on the one GPU, in the order of PLAN: a recipe on the 3 folds of a split seed
(exactly cv.py's folds, split files and options), and the shipped network
(train_shipped_model.py's command). Fold networks trained on the CPU can be carried in through
--models (a folder laid out as cv.py's --work). No job starts that would not end before the
limit; at the limit the rest are stopped. Then every fold network trained here gets cv.py's
logits (held-out and val patients, 8 dihedral views, on the GPU), and OUT gets the trained
models and logits as tar files of at most 15 MiB, and gpu_cv.json (jobs, seconds, machine).
Unpack them into .cache/cv and run cv.py: the scoring and figures are then made on the CPU,
exactly as for networks trained there.

--tiny: a small real store (8 official train, 4 official val and 3 extra patients of
../shared), one epoch on 512 patches per job, on whatever device there is: tests the plan,
the limit and the packing before GPU minutes are spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv
import train_shipped_model
from measure import cpu_model

REPO = Path(__file__).resolve().parents[1]
FOLDS = 3
# (recipe, split seed), most wanted first; "shipped" is the shipped network itself
PLAN: list[tuple[str, int | None]] = [("with-extra", 0), ("with-extra", 1), ("official-train", 0), ("shipped", None)]
PART_BYTES = 15 * 2**20


@dataclass
class Job:
    recipe: str
    seed: int | None
    fold: int | None
    out: Path
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    state: str = "waiting"  # waiting, running, done, failed, stopped, not started

    @property
    def name(self) -> str:
        return self.recipe if self.fold is None else f"{self.recipe} seed {self.seed} fold {self.fold}"


def plan_jobs(work: Path, store: Path, extra: list[str]) -> list[Job]:
    patches = cv.Patches.of(store)
    jobs = []
    for recipe, seed in PLAN:
        if recipe == "shipped":
            out = work / "shipped" / train_shipped_model.NAME
            jobs.append(Job(recipe, None, None, out, train_shipped_model.training_command(store, out) + extra))
            continue
        fold_of = cv.fold_assignment(patches, FOLDS, seed)
        for fold in range(1, FOLDS + 1):
            out, command = cv.training_command(recipe, store, work / f"seed-{seed}", fold_of, fold)
            jobs.append(Job(recipe, seed, fold, out, command + extra))
    return [job for job in jobs if not (job.out / "model.json").exists()]  # carried in, or trained before


def run_jobs(jobs: list[Job], parallel: int, deadline: float, guess_seconds: float, log) -> None:
    """Start ready jobs in plan order while slots and time allow; stop what runs at the deadline."""
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    while True:
        now = time.monotonic()
        for job in (j for j in jobs if j.state == "running"):
            code = job.process.poll()
            if code is not None:
                job.seconds = now - job.started
                job.state = "done" if code == 0 and (job.out / "model.json").exists() else "failed"
                log(f"{job.state}: {job.name} in {job.seconds:.0f} s")
        finished = [j.seconds for j in jobs if j.state == "done"]
        expected = max(finished) if finished else guess_seconds
        running = sum(j.state == "running" for j in jobs)
        for job in jobs:
            if running >= parallel or now + expected > deadline:
                break
            if job.state == "waiting":
                job.out.parent.mkdir(parents=True, exist_ok=True)
                with open(job.out.parent / f"{job.out.name}.log", "w") as errors:  # the child keeps its own copy
                    job.process = subprocess.Popen(job.command, env=environment, start_new_session=True,
                                                   stdout=subprocess.DEVNULL, stderr=errors)
                job.started, job.state = now, "running"
                running += 1
                log(f"started: {job.name}")
        if running == 0:
            break
        if now > deadline:
            for job in (j for j in jobs if j.state == "running"):
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
                job.state, job.seconds = "stopped", now - job.started
                log(f"stopped at the limit: {job.name}")
            break
        time.sleep(1)
    for job in jobs:
        if job.state == "waiting":
            job.state = "not started"


def fold_logits(jobs: list[Job], store: Path, work: Path, log) -> list[str]:
    """cv.py's logits (held-out and val patients) of every fold network trained here."""
    patches, done = cv.Patches.of(store), []
    for job in (j for j in jobs if j.state == "done" and j.fold is not None):
        started = time.perf_counter()
        cv.fold_logits(job.recipe, store, work / f"seed-{job.seed}", cv.fold_assignment(patches, FOLDS, job.seed), job.fold)
        log(f"logits: {job.name} in {time.perf_counter() - started:.0f} s")
        done.append(job.name)
    return done


def pack_results(jobs: list[Job], work: Path, out: Path) -> list[str]:
    """The models trained here (and their logits) as tar files of at most PART_BYTES."""
    files = []
    for job in (j for j in jobs if j.state == "done"):
        for name in ("model.safetensors", "model.json", "logits.npz"):
            path = job.out / name
            if path.exists():
                files.append((path, str(path.relative_to(work))))
    parts, part, size = [], None, 0
    for path, name in files:
        if part is None or size + path.stat().st_size > PART_BYTES:
            if part is not None:
                part.close()
            parts.append(f"models-{len(parts) + 1}.tar")
            part, size = tarfile.open(out / parts[-1], "w"), 0
        part.add(path, arcname=name)
        size += path.stat().st_size
    if part is not None:
        part.close()
    return parts


def tiny_store(work: Path) -> Path:
    """15 real patients (8 official train, 4 official val, 3 extra) in one store."""
    lists = {name: (cv.SHARED / f"cases_{name}.txt").read_text().split() for name in ("train", "val", "extra")}
    patches = REPO / ".cache" / "real-idc" / "everything"
    if not patches.is_dir():
        subprocess.run([sys.executable, str(cv.SHARED / "unpack.py"), str(patches), "--split", "everything"], check=True, stdout=subprocess.DEVNULL)
    chosen = work / "tiny-patients"
    chosen.mkdir(parents=True, exist_ok=True)
    for patient in lists["train"][:8] + lists["val"][:4] + lists["extra"][:3]:
        if not (chosen / patient).exists():
            shutil.copytree(patches / patient, chosen / patient)
    store = work / "stores" / "tiny"
    if not (store / "store.json").exists():
        subprocess.run([sys.executable, "-m", "histoscreen.cli", "prepare", str(chosen), str(store), "-q"], check=True)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=Path, help="the carried chunks and meta/ of gpu_data.py pack")
    parser.add_argument("--models", type=Path, help="fold models trained elsewhere, laid out as cv.py's --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-cv"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / ".cache" / "gpu-cv")))
    parser.add_argument("--minutes", type=float, default=8.5, help="the whole run's limit, packing included")
    parser.add_argument("--parallel", type=int, default=8, help="training jobs at once on the one GPU")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    began = time.monotonic()
    deadline = began + args.minutes * 60 - (20 if args.tiny else 75)  # time kept for the logits and packing
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        line = f"[{time.monotonic() - began:5.0f} s] {line}"
        lines.append(line)
        print(line, flush=True)

    import torch

    if args.tiny:
        store = tiny_store(args.work)
        extra = ["--epochs", "1", "--max-train-patches", "512", "--arch-kwargs", '{"widths": [16, 16, 16], "blocks": [1, 1, 1], "stem": 8}']
    else:
        import gpu_data

        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: run with --tiny to test the script")
        store = gpu_data.unpack(sorted(args.chunks.glob("c[0-9]*")), args.chunks / "meta", args.work / "stores")["cv"]
        extra = []
    if args.models:
        shutil.copytree(args.models, args.work, dirs_exist_ok=True)
    log(f"store ready: {store}")
    jobs = plan_jobs(args.work, store, extra)
    run_jobs(jobs, args.parallel, deadline, guess_seconds=60 if args.tiny else 240, log=log)
    logits = fold_logits(jobs, store, args.work, log)
    parts = pack_results(jobs, args.work, args.out)
    figures = {
        "machine": {"cpu": cpu_model(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    "torch": torch.__version__},
        "tiny": args.tiny, "parallel": args.parallel, "seconds": time.monotonic() - began,
        "jobs": [{"job": j.name, "state": j.state, "seconds": round(j.seconds, 1)} for j in jobs],
        "logits": logits, "parts": parts, "log": lines,
    }
    for job in (j for j in jobs if j.state == "failed"):
        log(f"failed: {job.name}: " + (job.out.parent / f"{job.out.name}.log").read_text()[-600:])
    (args.out / "gpu_cv.json").write_text(json.dumps(figures, indent=1) + "\n")
    log(f"done: {sum(j.state == 'done' for j in jobs)} of {len(jobs)} jobs; {', '.join(parts)} in {args.out}")


if __name__ == "__main__":
    main()
