"""Three real slides that ship with the package, so the demo screens real tissue.

Official val patients 8917, 8956 and 16896 of the Kaggle set (CC0), every patch recovered
for them, stored as lossy WebP mosaics plus their patch tables (benchmarks/pack_demo_slides.py).
These patients helped choose the shipped model's epoch, threshold and slide context, and
the compression changes pixels slightly: the demo shows the product, not its accuracy.
"""

from __future__ import annotations

import io
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from histoscreen.atomic import atomic_folder
from histoscreen.constants import COORD_ORIGIN
from histoscreen.data.naming import patch_file_name
from histoscreen.progress import Progress, silent

DEMO_FILE = "val_slides.npz"


def demo_slides() -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """Per patient: (file name, label, pixels cut to the patch's true size) of every patch."""
    with resources.files("histoscreen.data").joinpath("demo", DEMO_FILE).open("rb") as handle:
        packed = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    about = json.loads(packed["about"].tobytes())
    slides = {}
    for patient in about["patients"]:
        mosaic = np.asarray(Image.open(io.BytesIO(packed[f"{patient}_mosaic"].tobytes())).convert("RGB"))
        left, top = (int(v) for v in packed[f"{patient}_origin"])
        patches = []
        for x, y, label, width, height in packed[f"{patient}_patches"].tolist():
            row, column = y - COORD_ORIGIN - top, x - COORD_ORIGIN - left
            pixels = mosaic[row : row + height, column : column + width]
            patches.append((patch_file_name(patient, x, y, label), label, pixels))
        slides[patient] = patches
    return slides


def write_demo_slides(out: str | os.PathLike, *, overwrite: bool = False, progress: Progress = silent) -> dict[str, int]:
    """Write the demo slides as Kaggle-layout PNGs under `out`; returns patches per patient."""
    slides = demo_slides()
    counts = {}
    with atomic_folder(Path(out), overwrite=overwrite, kind="demo slides") as partial:
        for number, (patient, patches) in enumerate(slides.items(), start=1):
            for label in (0, 1):
                (partial / patient / str(label)).mkdir(parents=True)
            for name, label, pixels in patches:
                Image.fromarray(np.ascontiguousarray(pixels)).save(partial / patient / str(label) / name)
            counts[patient] = len(patches)
            progress("writing demo slides", number, len(slides))
    return counts
