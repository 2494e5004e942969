"""Whole-slide image files for the tests and benchmarks: pyramidal tiled TIFFs with
resolution tags, as scanners write them (tifffile writes; OpenSlide reads them back as
generic TIFF). Not part of the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histoscreen.constants import BACKGROUND_RGB, COORD_ORIGIN
from histoscreen.data import PatchBatch


def stitch(batch: PatchBatch) -> np.ndarray:
    """A slide's patches placed on its 50-px grid from the slide's origin (x = 1 is column 0),
    white where no patch was cut: the slide at the Kaggle set's 4 µm/px."""
    height = int((batch.ys - COORD_ORIGIN + batch.heights).max())
    width = int((batch.xs - COORD_ORIGIN + batch.widths).max())
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    for pixels, x, y, w, h in zip(batch.pixels, batch.xs, batch.ys, batch.widths, batch.heights):
        image[y - COORD_ORIGIN : y - COORD_ORIGIN + h, x - COORD_ORIGIN : x - COORD_ORIGIN + w] = pixels[:h, :w]
    return image


def write_pyramid_tiff(
    path: Path, level0: np.ndarray, mpp: float, *, levels: int = 4, compression: str = "jpeg", quality: int = 90,
    tile: int = 256, with_resolution: bool = True, description: str | None = None, mpp_y: float | None = None,
) -> Path:
    """`level0` (H x W x 3 uint8) as a tiled pyramid, each level half the one before (area
    averaged), with resolution tags giving `mpp` µm/px at level 0; `description` is level 0's
    ImageDescription (an Aperio-style one makes OpenSlide read it as Aperio); `mpp_y`, when
    given, makes the pixels taller than wide."""
    import tifffile

    options = {"compressionargs": {"level": quality}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        image = level0
        for level in range(levels):
            resolution = {}
            if with_resolution:
                per_cm = 1e4 / (mpp * 2**level)
                per_cm_y = 1e4 / ((mpp_y or mpp) * 2**level)
                resolution = {"resolution": (per_cm, per_cm_y), "resolutionunit": "CENTIMETER"}
            extra = {"description": description, "metadata": None} if description is not None and level == 0 else {}
            writer.write(image, tile=(tile, tile), compression=compression, photometric="rgb",
                         subfiletype=0 if level == 0 else 1, **resolution, **options, **extra)
            if min(image.shape[:2]) < 2 * tile:
                break
            image = np.asarray(Image.fromarray(image).reduce(2))
    return path


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel repeated factor x factor times: the same slide at a finer pixel size."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def write_claimed_tiff(path: Path, side_px: int, mpp: float, tile: int = 512) -> Path:
    """A small file (about 1 MB) for a large blank slide of side_px x side_px px at `mpp`:
    what a header claims, not what the file holds, is what must be checked."""
    import tifffile

    blank = np.full((tile, tile, 3), 230, dtype=np.uint8)
    count = (-(-side_px // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write((blank for _ in range(count)), shape=(side_px, side_px, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path
