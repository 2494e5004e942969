#!/usr/bin/env python3
"""Scale-out on Ray: the local engine against Ray with 1 and 2 actors on this machine, and a
projection of screening 10,000 whole-slide images on N nodes from the measured costs.

usage: python benchmarks/ray_scale.py [--store STORE] [--slides 4] [--tiles-per-slide 5000]

Rows (each its own process, wall time and peak memory of the process tree, Ray's daemons
and actors included):
  predict  a packed store of every REAL patch we have (built from ../shared when no --store)
  screen   generated pyramidal JPEG TIFFs of SYNTHETIC tissue at 0.5 µm/px (wsi_throughput's)
plus Ray's fixed cost: starting a local instance and its actors on a one-patch input.
On 2 cores Ray cannot win: it adds its start-up and daemons to the same two cores. The
projection assumes nodes whose cores score like this machine's, one actor per core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from measure import cpu_model, run_measured
from wsi_throughput import MODEL_MPP, model_resolution_image, write_slide

REPO = Path(__file__).resolve().parents[1]
HISTOSCREEN = [sys.executable, "-m", "histoscreen.cli"]
ENGINES = {"local": [], "ray, 1 actor": ["--engine", "ray", "--ray-workers", "1"], "ray, 2 actors": ["--engine", "ray", "--ray-workers", "2"]}


def real_store(work: Path) -> Path:
    """Every real patch we have (official train and val patients), packed."""
    store = work / "real-store"
    if not store.exists():
        unpacked = work / "real"
        subprocess.run([sys.executable, str(REPO.parent / "shared" / "data" / "idc" / "unpack.py"), str(unpacked), "--split", "full"],
                       check=True, capture_output=True)
        subprocess.run([*HISTOSCREEN, "prepare", str(unpacked), str(store), "-q"], check=True)
    return store


def generated_slides(work: Path, count: int) -> list[Path]:
    width, height, mpp = 16_000, 12_000, 0.5
    factor = round(MODEL_MPP / mpp)
    folder = work / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    slides = []
    for number in range(count):
        path = folder / f"{900700 + number}.tif"
        if not path.exists():
            image = model_resolution_image(width // factor, height // factor)
            write_slide(path, image[:, ::-1].copy() if number % 2 else image, mpp)  # two different tissues
        slides.append(path)
    return slides


def tissue_seconds_per_slide(slides: list[Path]) -> float:
    """What the driver does alone, slide after slide: open it (its tissue is found by a worker)."""
    from histoscreen.data.wsi import WholeSlideSource

    started = time.perf_counter()
    for slide in slides:
        WholeSlideSource(slide, spacing_um_px=MODEL_MPP)
    return (time.perf_counter() - started) / len(slides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a packed store to predict (default: all the real patches we have)")
    parser.add_argument("--slides", type=int, default=4, help="generated whole-slide images to screen")
    parser.add_argument("--tiles-per-slide", type=int, default=5000, help="projection: tissue tiles of an average slide at 4 µm/px")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "ray-scale")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.store or real_store(args.work)
    slides = generated_slides(args.work, args.slides)
    patches = json.loads((store / "store.json").read_text())["patches"]

    one_patch = args.work / "one-patch"
    if not one_patch.exists():
        subprocess.run([*HISTOSCREEN, "demo-slides", str(args.work / "demo"), "-q"], check=True)
        first = sorted((args.work / "demo").rglob("*.png"))[0]
        one_patch.mkdir()
        (one_patch / first.name).write_bytes(first.read_bytes())
    local_fixed, _ = run_measured([*HISTOSCREEN, "predict", str(one_patch), "--out", str(args.work / "one.csv"), "--overwrite", "-q"])
    ray_fixed, _ = run_measured([*HISTOSCREEN, "predict", str(one_patch), "--out", str(args.work / "one.csv"), "--overwrite", "-q",
                                 *ENGINES["ray, 2 actors"]])

    rows = []
    for engine, options in ENGINES.items():
        seconds, peak = run_measured([*HISTOSCREEN, "predict", str(store), "--out", str(args.work / "preds.csv"), "--overwrite", "-q", *options])
        rows.append(("predict, real patch store", engine, patches, seconds, peak))
    for engine, options in ENGINES.items():
        report = args.work / "report"
        seconds, peak = run_measured([*HISTOSCREEN, "screen", *map(str, slides), "--out", str(report), "--overwrite", "-q", *options])
        tiles = sum(s["patches"] for s in json.loads((report / "slides.json").read_text())["slides"])
        rows.append((f"screen, {len(slides)} synthetic WSIs", engine, tiles, seconds, peak))

    print(f"local engine vs Ray on this machine: {cpu_model()}")
    print(f"fixed cost of a one-patch run: local {local_fixed:.1f} s, Ray with 2 actors {ray_fixed:.1f} s (start-up of Ray and its actors)")
    print(f"{'task':32} {'engine':14} {'patches':>8} {'seconds':>8} {'patches/s':>10} {'net/s':>8} {'peak MiB':>9}")
    for task, engine, count, seconds, peak in rows:
        fixed = ray_fixed if engine.startswith("ray") else local_fixed
        print(f"{task:32} {engine:14} {count:8,} {seconds:8.1f} {count / seconds:10,.0f} {count / max(seconds - fixed, 1e-9):8,.0f} {peak:9.0f}")
    print("net/s: without the fixed cost of a one-patch run")

    # projection: per-tile CPU cost of screening on Ray, measured with 2 actors on 2 cores
    _, _, tiles, seconds, _ = rows[-1]
    cpu_seconds_per_tile = (seconds - ray_fixed) * 2 / tiles
    serial_per_slide = tissue_seconds_per_slide(slides)
    total_cpu_hours = 10_000 * args.tiles_per_slide * cpu_seconds_per_tile / 3600
    print(f"\nprojection, 10,000 whole-slide images of {args.tiles_per_slide:,} tissue tiles each "
          f"({10_000 * args.tiles_per_slide / 1e6:,.0f} M tiles), from {cpu_seconds_per_tile * 1e3:.2f} CPU-ms per tile (screen on Ray "
          f"here) and {serial_per_slide:.2f} s per slide on the driver (opening it; workers find its tissue): {total_cpu_hours:,.0f} CPU-hours")
    print(f"{'nodes x cores':>14} {'hours':>8}")
    for nodes in (1, 4, 16, 64):
        cores = 16
        hours = total_cpu_hours / (nodes * cores) + 10_000 * serial_per_slide / 3600
        print(f"{f'{nodes} x {cores}':>14} {hours:8.1f}")
    print("assumes cores like this machine's, one actor per core, shared storage fast enough to feed them; the driver's "
          "serial pass over the slides is added in full")


if __name__ == "__main__":
    main()
