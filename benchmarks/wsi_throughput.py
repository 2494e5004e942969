#!/usr/bin/env python3
"""Whole-slide screening end to end: tissue tiles per second and peak memory, at two slide
sizes, next to screening the same tiles from a packed patch store.

usage: python benchmarks/wsi_throughput.py [--width 40000 --height 30000] [--mpp 0.5]

A batch row screens several copies of the full slide in one command, as a lab would: the
fixed costs of a run (Python, torch and ONNX Runtime start-up, the model) are paid once.
Generates a pyramidal JPEG TIFF (tifffile, written tile by tile, so the slide is never in
memory here either) of SYNTHETIC tissue (histoscreen synth's slides tiled across the glass)
at 0.5 µm/px, and a quarter-area one as the baseline for memory growth. Each is screened by
`histoscreen screen FILE` with the shipped model in its own process; peak memory is the
proportional anonymous memory of the process tree (the tile reader threads are in it). The
patch-store row screens the slide's own tissue tiles, cut out and packed with `prepare`.
No figure here says anything about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from measure import cpu_model, matmul_gflops, run_measured

REPO = Path(__file__).resolve().parents[1]
MODEL_MPP = 4.0


def model_resolution_image(width: int, height: int) -> np.ndarray:
    """Synthetic tissue at 4 µm/px covering (width, height) px, slides side by side."""
    from histoscreen.data import generate_slide

    image = np.full((height, width, 3), 255, dtype=np.uint8)
    index, top = 0, 0
    while top < height:
        left, row_height = 0, 0
        while left < width:
            slide = generate_slide(index, seed=3, idc_fraction=0.3).rgb
            index += 1
            h, w = min(slide.shape[0], height - top), min(slide.shape[1], width - left)
            image[top : top + h, left : left + w] = slide[:h, :w]
            left += w
            row_height = max(row_height, h)
        top += row_height
    return image


def write_slide(path: Path, model_image: np.ndarray, mpp: float, tile: int = 512) -> tuple[int, int]:
    """The pyramid, level 0 at `mpp`, each level's tiles made on the fly from the 4 µm/px image."""
    import tifffile

    factor = round(MODEL_MPP / mpp)  # level-0 px per model px
    height, width = model_image.shape[0] * factor, model_image.shape[1] * factor
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        level = 0
        while True:
            downsample = 2**level
            scale = factor / downsample  # level px per model px
            level_height, level_width = -(-height // downsample), -(-width // downsample)

            def tiles():
                for top in range(0, level_height, tile):
                    for left in range(0, level_width, tile):
                        rows = (np.arange(top, top + tile) / scale).astype(int).clip(0, model_image.shape[0] - 1)
                        columns = (np.arange(left, left + tile) / scale).astype(int).clip(0, model_image.shape[1] - 1)
                        yield model_image[rows[:, None], columns[None, :]]

            per_cm = 1e4 / (mpp * downsample)
            writer.write(tiles(), shape=(level_height, level_width, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                         compressionargs={"level": 90}, photometric="rgb", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                         subfiletype=0 if level == 0 else 1)
            if max(level_height, level_width) <= 2048:
                break
            level += 1
    return width, height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4, help="slides in the batch row (default: 4)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "wsi-throughput")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    histoscreen = [sys.executable, "-m", "histoscreen.cli"]
    factor = round(MODEL_MPP / args.mpp)
    rows = []
    for name, scale in (("quarter", 0.5), ("full", 1.0)):
        width, height = int(args.width * scale), int(args.height * scale)
        slide = args.work / f"slide-{width}x{height}.tif"
        if not slide.exists():
            write_slide(slide, model_resolution_image(width // factor, height // factor), args.mpp)
        report = args.work / f"report-{name}"
        seconds, peak = run_measured([*histoscreen, "screen", str(slide), "--out", str(report), "--overwrite", "-q"])
        summary = json.loads((report / "slides.json").read_text())
        tiles = summary["slides"][0]["patches"]
        rows.append((f"whole-slide TIFF {width:,} x {height:,} px ({slide.stat().st_size / 1e6:,.0f} MB)", tiles, seconds, peak))
    # a batch, as a lab screens: the run's fixed costs (start-up, model, report index) paid once
    batch = args.work / "batch"
    shutil.rmtree(batch, ignore_errors=True)
    batch.mkdir()
    for copy in range(args.batch):
        os.link(slide, batch / f"slide-{copy + 1}.tif")  # the same file under four names: no disk used
    report = args.work / "report-batch"
    seconds, peak = run_measured([*histoscreen, "screen", str(batch), "--out", str(report), "--overwrite", "-q"])
    tiles = sum(s["patches"] for s in json.loads((report / "slides.json").read_text())["slides"])
    rows.append((f"a batch of {args.batch} such slides, one command", tiles, seconds, peak))
    shutil.rmtree(batch)
    # the same tissue tiles as patches in a store: cut out of the full slide, packed, screened
    patches = args.work / "patches"
    if not (args.work / "store").exists():
        from histoscreen.data.inputs import SlideReading, open_sources

        [source] = open_sources([slide], slides=SlideReading(MODEL_MPP))
        shutil.rmtree(patches, ignore_errors=True)
        for batch in source.batches(batch_size=1024):
            for pixels, x, y in zip(batch.pixels, batch.xs, batch.ys):
                folder = patches / "900500" / "0"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"900500_idx5_x{x}_y{y}_class0.png")
        run_measured([*histoscreen, "prepare", str(patches), str(args.work / "store"), "-q"])
    seconds, peak = run_measured([*histoscreen, "screen", str(args.work / "store"), "--out", str(args.work / "report-store"),
                                  "--overwrite", "-q", "--ignore-name-labels"])
    tiles = json.loads((args.work / "report-store" / "slides.json").read_text())["slides"][0]["patches"]
    rows.append(("the same tiles from a packed patch store", tiles, seconds, peak))

    print(f"screen, end to end, shipped model with slide context; SYNTHETIC tissue; {cpu_model()}, {matmul_gflops():.0f} GFLOP/s float32 matmul now")
    print(f"{'input':58} {'tissue tiles':>12} {'seconds':>8} {'tiles/s':>8} {'peak MiB':>9}")
    for label, tiles, seconds, peak in rows:
        print(f"{label:58} {tiles:12,} {seconds:8.1f} {tiles / seconds:8,.0f} {peak:9.0f}")
    print(f"full slide vs quarter: x{rows[1][1] / rows[0][1]:.2f} tiles, x{rows[1][3] / rows[0][3]:.2f} peak memory; "
          f"full slide vs store: x{(rows[1][1] / rows[1][2]) / (rows[3][1] / rows[3][2]):.2f} tiles/s")
    steady = steady_state(slide)
    _, batch_tiles, batch_seconds, _ = rows[2]
    peak = max(row[3] for row in rows)

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    print(f"target steady state (read + score) >= 1,500 tiles/s: {steady:,.0f}, {verdict(steady >= 1500)}")
    print(f"target a batch of {args.batch} slides >= 1,000 tiles/s end to end: {batch_tiles / batch_seconds:,.0f}, "
          f"{verdict(batch_tiles / batch_seconds >= 1000)}")
    print(f"target peak memory < 1.5 GiB: {peak:,.0f} MiB, {verdict(peak < 1536)}")


def steady_state(slide: Path) -> float:
    """Without the fixed costs of a run (start-up, model, report): finding tissue, reading
    tiles, reading and scoring them, in this process; returns read-and-scored tiles/s."""
    import time

    from histoscreen.data.wsi import WholeSlideSource
    from histoscreen.runtime import Predictor

    predictor = Predictor()
    predictor.patch_logits(np.zeros((256, 50, 50, 3), dtype=np.uint8))  # warm-up
    started = time.perf_counter()
    source = WholeSlideSource(slide, spacing_um_px=MODEL_MPP)
    tiles = len(source)
    found = time.perf_counter()
    for _ in source.batches(256):
        pass
    read = time.perf_counter()
    for batch in source.batches(256):
        predictor.patch_logits(batch.pixels)
    scored = time.perf_counter()
    print(f"steady state, full slide: tissue found in {found - started:.1f} s; tiles read at {tiles / (read - found):,.0f}/s, "
          f"read and scored at {tiles / (scored - read):,.0f}/s")
    return tiles / (scored - read)


if __name__ == "__main__":
    main()
