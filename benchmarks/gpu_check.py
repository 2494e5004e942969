#!/usr/bin/env python3
"""The prepared GPU run: what histoscreen does on CUDA, measured in one short script.

usage: python benchmarks/gpu_check.py [--tiny] [--store STORE] [--out DIR]

1. one training epoch of the shipped recipe on CUDA (and, with two or more GPUs, the same
   epoch under torchrun on NCCL), seconds and patches/s;
2. `predict` throughput on CUDA: torch, and ONNX Runtime's CUDA provider when installed.
The expensive CV candidates have their own script: benchmarks/gpu_cv.py.
Figures go to OUT/gpu_check.json and are printed. --tiny runs every step on a small
synthetic store, on whatever device there is (the CPU here), to test the script before
spending GPU minutes; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import cpu_model
from train_shipped_model import TRAIN_ARGS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(command: list[str]) -> float:
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small synthetic store, any device: tests the script")
    parser.add_argument("--store", type=Path, help="a packed store (default: .cache/cv/store, all real patients)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / ".cache" / "gpu-check")))
    args = parser.parse_args()

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.tiny:
        sys.exit("no CUDA device here: run with --tiny to test the script")
    figures: dict = {
        "machine": {"cpu": cpu_model(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    "torch": torch.__version__, "python": platform.python_version()},
        "tiny": args.tiny,
    }
    if args.tiny:
        store = work / "store"
        subprocess.run([*histoscreen, "synth", str(work / "slides"), "--patients", "6", "-q"], check=True)
        subprocess.run([*histoscreen, "prepare", str(work / "slides"), str(store), "-q"], check=True)
        recipe = ["--arch-kwargs", '{"widths": [16, 32, 32], "blocks": [1, 1, 1], "stem": 16}', "--split-scheme", "kfold", "--folds", "3"]
    else:
        store = args.store or REPO / ".cache" / "cv" / "store"
        recipe = ["--split-scheme", "kfold", "--folds", "3"]
    patches = json.loads((store / "store.json").read_text())["patches"]
    train = [*TRAIN_ARGS, *recipe, "--epochs", "1", "-q", "--device", device]

    seconds = timed([*histoscreen, "train", str(store), "--out", str(work / "one-gpu"), *train])
    figures["train_one_epoch"] = {"device": device, "seconds": seconds, "store_patches": patches}
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        seconds = timed([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(gpus), str(BIN / "histoscreen"), "train",
                         str(store), "--out", str(work / "ddp"), *train])
        figures["train_one_epoch_ddp_nccl"] = {"gpus": gpus, "seconds": seconds}

    model = work / "one-gpu"
    for backend in ("torch", "onnx"):
        if backend == "onnx":
            import onnxruntime

            if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                figures["predict_onnx"] = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
                continue
        for batch in (256, 1024):
            seconds = timed([*histoscreen, "predict", str(store), "--model", str(model), "--out", str(work / f"p-{backend}.csv"),
                             "--overwrite", "-q", "--device", device, "--backend", backend, "--batch-size", str(batch)])
            figures[f"predict_{backend}_batch{batch}"] = {"seconds": seconds, "patches_per_second": patches / seconds}

    (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
