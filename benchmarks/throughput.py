#!/usr/bin/env python3
"""Inference throughput of the shipped model against a ResNet-18 peer baseline, one run.

usage: python benchmarks/throughput.py [--quick] [--patches N] [--batch-size B]

Every row runs in its own process and reads the same patches: the real ones of
../shared/data/idc when present (packed once into .cache/), synthetic slides otherwise.
Patches/s is end to end: reading, normalising, batching, the model and the threshold
(plus PNG decoding for the folder rows, and upsampling for ResNet-18@224). Memory is the
row's peak proportional anonymous memory. The hardware limit is this machine's float32
matrix-multiply rate measured now; a row's share of it counts the model's own FLOPs.
The ResNet-18 rows use random weights: speed does not depend on them, and the project
trains no ResNet-18 (its accuracy is not claimed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from measure import cpu_model, run_measured

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"


def matmul_gflops(size: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def run_row(row: str, store_path: str, folder: str, limit: int, batch_size: int) -> dict:
    """One measurement, in this process: patches/s of the named pipeline."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from histoscreen.data import PatchStore
    from histoscreen.data.transforms import Normalisation, to_model_input
    from histoscreen.models import count_flops, create_model
    from histoscreen.report import write_predictions
    from histoscreen.runtime import Predictor
    from histoscreen.tasks import predict

    store = PatchStore(store_path)
    count = min(limit, len(store))
    if row in ("store-torch", "store-onnx"):
        predictor = Predictor(backend=row.split("-")[1], batch_size=batch_size)
        predictor.probabilities(store.patches[:batch_size])  # warm-up
        started = time.perf_counter()
        called = 0
        for start in range(0, count, 8192):
            called += int((predictor.probabilities(store.patches[start : min(start + 8192, count)]) >= predictor.threshold).sum())
        seconds = time.perf_counter() - started
        return {"patches": count, "seconds": seconds, "flops": count_flops(predictor.model.cpu())}
    if row == "store-default":  # what `histoscreen predict STORE --out F` does: slide context, CSV written
        started = time.perf_counter()
        predictions = predict([store_path], batch_size=batch_size)
        write_predictions(predictions, Path(store_path).parent / f"{row}.csv", overwrite=True)
        seconds = time.perf_counter() - started
        return {"patches": len(predictions.rows), "seconds": seconds, "flops": count_flops(Predictor().model.cpu())}
    if row in ("folder-torch", "folder-onnx"):
        files = sorted(Path(folder).rglob("*.png"))[:limit]
        started = time.perf_counter()
        predictions = predict(files, backend=row.split("-")[1], batch_size=batch_size)
        write_predictions(predictions, Path(store_path).parent / f"{row}.csv", overwrite=True)
        seconds = time.perf_counter() - started
        predictor = Predictor(backend="torch")
        return {"patches": len(files), "seconds": seconds, "flops": count_flops(predictor.model.cpu())}
    size = 224 if row == "resnet18-224" else 50
    model = create_model("resnet18").eval().to(memory_format=torch.channels_last)
    normalisation = Normalisation.of(np.asarray(store.patches[:2000]))
    # ResNet-18 @224 runs at tens of patches/s: a few hundred patches time it well enough.
    count = min(count, (32 if limit < 1000 else 256) if size == 224 else count)
    batch = min(batch_size, 64) if size == 224 else batch_size
    with torch.inference_mode():
        model(torch.zeros(2, 3, size, size))
        started = time.perf_counter()
        for start in range(0, count, batch):
            images = to_model_input(torch.from_numpy(np.array(store.patches[start : min(start + batch, count)])), normalisation)
            if size != 50:
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            (torch.sigmoid(model(images.contiguous(memory_format=torch.channels_last))) >= 0.5).sum()
        seconds = time.perf_counter() - started
    return {"patches": count, "seconds": seconds, "flops": count_flops(model, size)}


def prepare_inputs(quick: bool) -> tuple[Path, Path, str]:
    cache = REPO / ".cache" / "throughput"
    cache.mkdir(parents=True, exist_ok=True)
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    if not quick and (SHARED / "unpack.py").is_file():
        folder = REPO / ".cache" / "real-idc" / "all"
        subprocess.run([sys.executable, str(SHARED / "unpack.py"), str(folder), "--split", "all"], check=True, stdout=subprocess.DEVNULL)
        described = "real patches of ../shared/data/idc (official train + half of each val patient)"
    else:
        folder = cache / ("synthetic-quick" if quick else "synthetic")
        if not folder.exists():
            subprocess.run([*histoscreen, "synth", str(folder), "--patients", "2" if quick else "40", "--quiet"], check=True)
        described = "SYNTHETIC slides" + (" (--quick)" if quick else " (../shared is absent)")
    store = cache / f"store-{folder.name}"
    if not store.exists():
        subprocess.run([*histoscreen, "prepare", str(folder), str(store), "--quiet"], check=True)
    return store, folder, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds on a tiny synthetic set (figures meaningless)")
    parser.add_argument("--patches", type=int, help="patches per row (default 36,457 / 600 with --quick)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    store, folder, described = prepare_inputs(args.quick)
    limit = args.patches or (600 if args.quick else 10**9)
    if args.row:
        print(json.dumps(run_row(args.row, str(store), str(folder), limit, args.batch_size)))
        return

    import onnxruntime
    import torch

    from histoscreen.models import shipped_model_path

    matrix = 1024 if args.quick else 2048
    rate = matmul_gflops(matrix, 2 if args.quick else 8)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"software: Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    print(f"input: {described}; shipped model {shipped_model_path().name}")
    print(f"float32 matrix multiply ({matrix}x{matrix}, torch): {rate:,.0f} GFLOP/s: the hardware limit below")
    rows = [
        ("resnet18-224", "peer baseline: ResNet-18 @224 (upsampled), torch"),
        ("resnet18-50", "ResNet-18 @50 (native size), torch"),
        ("store-torch", "shipped model, packed store, torch"),
        ("store-onnx", "shipped model, packed store, ONNX Runtime"),
        ("store-default", "predict STORE, the default (context, CSV)"),
        ("folder-torch", "shipped model, PNG folder, torch"),
        ("folder-onnx", "shipped model, PNG folder, ONNX Runtime"),
    ]
    print(f"\n{'pipeline (end to end)':46s} {'patches':>8s} {'patches/s':>10s} {'MFLOP/patch':>11s} {'% of limit':>10s} {'peak MiB':>9s} {'x baseline':>10s}")
    baseline = None
    speeds = {}
    for row, label in rows:
        command = [sys.executable, __file__, "--row", row, "--batch-size", str(args.batch_size)] + (["--quick"] if args.quick else [])
        if args.patches:
            command += ["--patches", str(args.patches)]
        output_path = store.parent / f"{row}.json"
        with open(output_path, "w") as handle:
            _, peak = run_measured(command, stdout=handle)
        result = json.loads(output_path.read_text().strip().splitlines()[-1])
        speed = result["patches"] / result["seconds"]
        baseline = baseline or speed
        speeds[row] = speed
        share = speed * result["flops"] / (rate * 1e9)
        print(f"{label:46s} {result['patches']:8,d} {speed:10,.0f} {result['flops'] / 1e6:11.1f} {share:10.0%} {peak:9.0f} {speed / baseline:10.1f}")
    print(f"\nthe whole Kaggle set (277,524 patches) from a store with ONNX Runtime: {277_524 / speeds['store-onnx']:.0f} s; "
          f"{speeds['store-onnx'] / speeds['resnet18-224']:.0f}x ResNet-18@224, {speeds['store-onnx'] / speeds['resnet18-50']:.1f}x ResNet-18@50")


if __name__ == "__main__":
    main()
