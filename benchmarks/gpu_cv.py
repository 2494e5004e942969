#!/usr/bin/env python3
"""The expensive cv.py candidates, trained side by side on one GPU within a time limit.

usage: python benchmarks/gpu_cv.py --chunks DIR --out DIR [--minutes 8.5] [--parallel 8]
       python benchmarks/gpu_cv.py --tiny --out DIR     (tests the script on the CPU here)

On a lent GPU machine (see benchmarks/gpu_data.py for how the real patches get there): rebuilds
the stores from the carried chunks, then runs `histoscreen train` jobs, several at once on
the one GPU, in the order of PLAN: each candidate on the 3 patient-grouped CV folds (exactly
cv.py's folds and options) and on the official split (the shipped model's recipe: train
patients, best epoch on half of each val patient). A distilled candidate starts once its
teachers of the same split are there; teachers trained on the CPU can be carried in through
--models (a folder laid out as cv.py's --work). No job starts that would not end before
the limit; at the limit the rest are stopped. Then every candidate whose three folds are
done gets its held-out patients' logits (8 dihedral views, float32, on the GPU), and OUT gets
the trained models and logits as tar files of at most 15 MiB, and gpu_cv.json (jobs,
seconds, machine). Unpack them into .cache/cv and run cv.py on the candidates: the scoring
and figures are then made on the CPU, exactly as for candidates trained here.

--tiny: a small real store (12 patients of ../shared, official and k-fold splits both work),
one epoch on 512 patches per job, on whatever device there is: tests the plan, the
teachers' hand-over, the limit and the packing before GPU minutes are spent.
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cv  # noqa: E402
from measure import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FOLDS = ("1", "2", "3")
ALL = (*FOLDS, "official")
# (candidate, splits), most wanted first
PLAN: list[tuple[str, tuple[str, ...]]] = [
    ("shipped", ALL),  # usually carried in: the CPU's folds and the shipped model's own run
    ("shipped-seed1", ALL),
    ("shipped-seed2", ALL),
    ("shipped-seed3", ALL),
    ("distil", ALL),
    ("distil-strong", ALL),
    ("wide", FOLDS),
    ("deep", FOLDS),
    ("longer", FOLDS),
    ("wide", ("official",)),
    ("deep", ("official",)),
    ("longer", ("official",)),
]
PART_BYTES = 15 * 2**20


@dataclass
class Job:
    candidate: str
    split: str
    out: Path
    command: list[str]
    needs: list[Path] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    state: str = "waiting"  # waiting, running, done, failed, stopped, not started


def split_folder(split: str) -> str:
    return split if split == "official" else f"fold-{split}"


def plan_jobs(work: Path, stores: dict[str, Path], extra: list[str]) -> list[Job]:
    jobs = []
    for candidate, splits in PLAN:
        for split in splits:
            out = work / candidate / split_folder(split)
            if (out / "model.json").exists():
                continue  # carried in, or trained before
            store = stores["shipped"] if split == "official" else stores["cv"]
            command = cv.training_command(candidate, store, work, split) + extra
            needs = [work / teacher / split_folder(split) / "model.json" for teacher in cv.TEACHERS.get(candidate, [])]
            jobs.append(Job(candidate, split, out, command, needs))
    return jobs


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
                log(f"{job.state}: {job.candidate} {job.split} in {job.seconds:.0f} s")
        finished = [j.seconds for j in jobs if j.state == "done"]
        expected = max(finished) if finished else guess_seconds
        running = sum(j.state == "running" for j in jobs)
        for job in jobs:
            if running >= parallel or now + expected > deadline:
                break
            if job.state == "waiting" and all(need.exists() for need in job.needs):
                job.out.parent.mkdir(parents=True, exist_ok=True)
                with open(job.out.parent / f"{job.out.name}.log", "w") as errors:  # the child keeps its own copy
                    job.process = subprocess.Popen(job.command, env=environment, start_new_session=True,
                                                   stdout=subprocess.DEVNULL, stderr=errors)
                job.started, job.state = now, "running"
                running += 1
                log(f"started: {job.candidate} {job.split}")
        if running == 0:
            break
        if now > deadline:
            for job in (j for j in jobs if j.state == "running"):
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
                job.state, job.seconds = "stopped", now - job.started
                log(f"stopped at the limit: {job.candidate} {job.split}")
            break
        time.sleep(1)
    for job in jobs:
        if job.state == "waiting":
            job.state = "not started"


def held_out_logits(jobs: list[Job], stores: dict[str, Path], work: Path, log) -> list[str]:
    """Logits of the held-out patients for each candidate trained here on all three folds."""
    done = []
    for candidate in dict.fromkeys(job.candidate for job in jobs):
        if all((work / candidate / f"fold-{fold}" / "model.json").exists() for fold in FOLDS):
            started = time.perf_counter()
            cv.fold_logits(candidate, stores["cv"], work, len(FOLDS))
            log(f"held-out logits: {candidate} in {time.perf_counter() - started:.0f} s")
            done.append(candidate)
    return done


def pack_results(jobs: list[Job], out: Path) -> list[str]:
    """The models trained here (and their held-out logits) as tar files of at most PART_BYTES."""
    files = []
    for job in (j for j in jobs if j.state == "done"):
        for name in ("model.safetensors", "model.json", "held-out-logits.npz"):
            path = job.out / name
            if path.exists():
                files.append((path, f"{job.candidate}/{job.out.name}/{name}"))
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


def tiny_stores(work: Path) -> dict[str, Path]:
    """12 real patients (8 official train, 4 official val), packed twice as the two stores."""
    official = {split: (cv.SHARED / f"cases_{split}.txt").read_text().split() for split in ("train", "val")}
    patches = REPO / ".cache" / "real-idc" / "full"
    if not patches.is_dir():
        subprocess.run([sys.executable, str(cv.SHARED / "unpack.py"), str(patches), "--split", "full"], check=True, stdout=subprocess.DEVNULL)
    chosen = work / "tiny-patients"
    chosen.mkdir(parents=True, exist_ok=True)
    for patient in official["train"][:8] + official["val"][:4]:
        if not (chosen / patient).exists():
            shutil.copytree(patches / patient, chosen / patient)
    store = work / "stores" / "tiny"
    if not (store / "store.json").exists():
        subprocess.run([sys.executable, "-m", "histoscreen.cli", "prepare", str(chosen), str(store), "-q"], check=True)
    return {"cv": store, "shipped": store}


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
        stores = tiny_stores(args.work)
        extra = ["--epochs", "1", "--max-train-patches", "512", "--arch-kwargs", '{"widths": [16, 16, 16], "blocks": [1, 1, 1], "stem": 8}']
    else:
        import gpu_data

        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: run with --tiny to test the script")
        stores = gpu_data.unpack(sorted(args.chunks.glob("c[0-9]*")), args.chunks / "meta", args.work / "stores")
        extra = []
    if args.models:
        shutil.copytree(args.models, args.work, dirs_exist_ok=True)
    log(f"stores ready: {', '.join(f'{k}={v}' for k, v in stores.items())}")
    jobs = plan_jobs(args.work, stores, extra)
    run_jobs(jobs, args.parallel, deadline, guess_seconds=60 if args.tiny else 240, log=log)
    logits = held_out_logits(jobs, stores, args.work, log)
    parts = pack_results(jobs, args.out)
    figures = {
        "machine": {"cpu": cpu_model(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    "torch": torch.__version__},
        "tiny": args.tiny, "parallel": args.parallel, "seconds": time.monotonic() - began,
        "jobs": [{"candidate": j.candidate, "split": j.split, "state": j.state, "seconds": round(j.seconds, 1)} for j in jobs],
        "held_out_logits": logits, "parts": parts, "log": lines,
    }
    for job in (j for j in jobs if j.state == "failed"):
        log(f"failed: {job.candidate} {job.split}: " + (job.out.parent / f"{job.out.name}.log").read_text()[-600:])
    (args.out / "gpu_cv.json").write_text(json.dumps(figures, indent=1) + "\n")
    log(f"done: {sum(j.state == 'done' for j in jobs)} of {len(jobs)} jobs; {', '.join(parts)} in {args.out}")


if __name__ == "__main__":
    main()
