#!/usr/bin/env python3
"""Pack the three real val slides `make demo` screens into src/histoscreen/data/demo/val_slides.npz.

usage: python benchmarks/pack_demo_slides.py [--out FILE]

Official VAL patients only (never test): 8917 (a large tumour), 8956 (a tumour among benign
ducts and stroma) and 16896 (a small focus), every patch recovered for them (val.zip and
val_rest.zip together). Each slide is stored as its rebuilt mosaic in lossy WebP (quality
90) plus a table of its patches (x, y, label, width, height), so three whole slides fit in
about 4 MB; `histoscreen demo-slides` cuts them back into Kaggle-layout PNGs. The WebP
compression changes pixels slightly, and these patients helped choose the shipped model's
epoch, threshold and context: the demo shows the product, not its accuracy.
The Kaggle data set is CC0.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"
OUT = REPO / "src" / "histoscreen" / "data" / "demo" / "val_slides.npz"
PATIENTS = ("8917", "8956", "16896")
QUALITY = 90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the packed file to write (default: {OUT.relative_to(REPO)})")
    out = parser.parse_args().out
    from histoscreen.data import official_split, open_sources
    from histoscreen.tasks.slides import SlideGrid, build_mosaic

    assert set(PATIENTS) <= official_split().val, "demo slides must come from official val patients"
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder:
        for split in ("val", "val-rest"):
            subprocess.run([sys.executable, str(SHARED / "unpack.py"), folder, "--split", split], check=True, stdout=subprocess.DEVNULL)
        for patient in PATIENTS:
            [source] = open_sources([Path(folder) / patient])
            slide = source.read_all()
            grid = SlideGrid.of(slide)
            buffer = io.BytesIO()
            Image.fromarray(build_mosaic(slide, grid)).save(buffer, format="WEBP", quality=QUALITY, method=6)
            arrays[f"{patient}_mosaic"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
            arrays[f"{patient}_patches"] = np.stack([slide.xs, slide.ys, slide.labels, slide.widths, slide.heights], axis=1).astype(np.int32)
            arrays[f"{patient}_origin"] = np.array(grid.pixel_origin, dtype=np.int32)
            print(f"{patient}: {len(slide):,} patches, {slide.labels.mean():.0%} IDC, mosaic {len(buffer.getvalue()) / 1e6:.2f} MB")
    about = {"patients": PATIENTS, "split": "official val", "webp_quality": QUALITY, "source": "Kaggle Breast Histopathology Images (CC0)"}
    arrays["about"] = np.frombuffer(json.dumps(about).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"written: {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
