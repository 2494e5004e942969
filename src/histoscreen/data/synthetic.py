"""Procedurally generated H&E-like slides, cut into patches in the exact Kaggle layout.

SYNTHETIC DATA: these slides are drawn by a program, not scanned from tissue. They serve
the tests and the demo, where a known ground truth is worth more than realism. Their
patient ids start at 900000 so they can never be confused with the real set's ids.

A slide has white background, pink stroma with fibrous texture, white fat vacuoles and
sparse small purple nuclei; IDC regions are contiguous blobs of dense, large, irregular,
dark nuclei. A patch is labelled IDC when at least half of its area lies in an IDC region.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from histoscreen.checks import number, whole_number
from histoscreen.errors import SettingError
from histoscreen.atomic import atomic_folder
from histoscreen.constants import (
    COORD_ORIGIN,
    GRID_STEP,
    KAGGLE_DUPLICATE_FOLDER,
    PATCH_SIZE,
    SYNTHETIC_PATIENT_BASE,
)
from histoscreen.data.naming import PatchName, patch_file_name
from histoscreen.progress import Progress, silent

# Kaggle kept only patches that are mostly tissue; background patches were never cut.
MIN_TISSUE_FRACTION = 0.25
IDC_LABEL_FRACTION = 0.5

_BACKGROUND = np.array([243, 241, 245], dtype=np.float32)
_STROMA = np.array([232, 158, 195], dtype=np.float32)
_TUMOUR_CYTOPLASM = np.array([206, 134, 188], dtype=np.float32)


@dataclass
class SyntheticSlide:
    """A generated slide with its ground truth; pixel (row, col) of `rgb` is slide (y-1, x-1)."""

    patient: str
    rgb: np.ndarray  # H x W x 3 uint8
    tissue: np.ndarray  # H x W bool
    idc: np.ndarray  # H x W bool

    def patches(self) -> Iterator[tuple[PatchName, np.ndarray]]:
        """The patches the Kaggle cutting would keep, with their true (possibly edge) size."""
        height, width = self.tissue.shape
        for top in range(0, height, GRID_STEP):
            for left in range(0, width, GRID_STEP):
                window = (slice(top, top + PATCH_SIZE), slice(left, left + PATCH_SIZE))
                area = self.tissue[window].size
                if self.tissue[window].sum() < MIN_TISSUE_FRACTION * area:
                    continue
                label = int(self.idc[window].sum() >= IDC_LABEL_FRACTION * area)
                name = PatchName(self.patient, left + COORD_ORIGIN, top + COORD_ORIGIN, label)
                yield name, self.rgb[window]


def generate_slide(patient_index: int, seed: int, *, idc_fraction: float | None = None) -> SyntheticSlide:
    """Draw one slide; the same (patient_index, seed) always gives the same pixels.

    `idc_fraction` is the share of tissue pixels inside IDC regions (default: drawn per
    slide, so that about 28% of all patches are IDC).
    """
    rng = np.random.default_rng([seed, patient_index])
    columns, rows = int(rng.integers(16, 28)), int(rng.integers(12, 22))
    # Cut the slide off mid-patch on the right and bottom, as a whole-mount scan ends
    # wherever the glass does: that makes the smaller edge patches of the real set.
    width = columns * GRID_STEP - int(rng.integers(10, 41))
    height = rows * GRID_STEP - int(rng.integers(10, 41))
    if idc_fraction is None:
        # Blob borders cut through patches and a patch needs half its area in IDC, so
        # this pixel share per slide gives about 28% IDC patches, as in the real set.
        idc_fraction = float(rng.uniform(0.14, 0.54))
    number("idc_fraction", idc_fraction, low=0, high=1)

    ramp = np.linspace(-0.4, 0.8, width, dtype=np.float32)[None, :]
    tissue_field = _smooth_field(rng, height, width, cell=180) + ramp
    tissue = tissue_field > np.quantile(tissue_field, 0.4)
    fat = tissue & (_smooth_field(rng, height, width, cell=90) > 1.0)
    idc = np.zeros_like(tissue)
    if idc_fraction > 0:
        tumour_field = _smooth_field(rng, height, width, cell=220)
        idc = tissue & (tumour_field >= np.quantile(tumour_field[tissue], 1.0 - idc_fraction))

    fibres = _smooth_field(rng, height, width, cell=6, stretch=5)
    canvas = np.where(tissue[..., None], _STROMA + 14 * fibres[..., None], _BACKGROUND)
    canvas = np.where(idc[..., None], _TUMOUR_CYTOPLASM + 10 * fibres[..., None], canvas)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    stroma = tissue & ~fat & ~idc
    for cy, cx in _points_in(rng, fat, per_pixel=1 / 260):
        radius = rng.uniform(5, 12)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(250, 247, 250), outline=(225, 160, 195))
    for cy, cx in _points_in(rng, stroma, per_pixel=1 / 240):
        rx, ry = rng.uniform(1.5, 3.2), rng.uniform(1.5, 3.2)
        shade = rng.normal(0, 12, 3)
        colour = tuple(int(v) for v in np.clip(np.array([125, 70, 160]) + shade, 0, 255))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    for cy, cx in _points_in(rng, idc, per_pixel=1 / 55):
        vertices = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radii = rng.uniform(3.5, 7.5) * rng.uniform(0.65, 1.3, vertices)
        polygon = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
        shade = rng.normal(0, 10, 3)
        colour = tuple(int(v) for v in np.clip(np.array([72, 28, 112]) + shade, 0, 255))
        draw.polygon(polygon, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(0.7))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3.0, (height, width, 3))
    pixels = np.where(tissue[..., None], pixels, _BACKGROUND + rng.normal(0, 1.5, (height, width, 3)))
    patient = str(SYNTHETIC_PATIENT_BASE + patient_index)
    return SyntheticSlide(patient, np.clip(pixels, 0, 255).astype(np.uint8), tissue, idc)


@dataclass(frozen=True)
class SyntheticSlideSummary:
    patient: str
    patches: int
    idc_patches: int
    edge_patches: int


def synthesize(
    out: str | os.PathLike,
    *,
    patients: int = 4,
    seed: int = 0,
    first_index: int = 0,
    doubled: bool = False,
    overwrite: bool = False,
    idc_fractions: list[float] | None = None,
    progress: Progress = silent,
) -> list[SyntheticSlideSummary]:
    """Write `patients` synthetic slides under `out` as <patient>/<0|1>/<kaggle name>.png.

    With `doubled`, every patch is also written under IDC_regular_ps50_idx5/, exactly as
    the Kaggle archive repeats itself.
    """
    whole_number("patients", patients)
    if idc_fractions is not None and len(idc_fractions) != patients:
        raise SettingError("idc_fractions", f"has {len(idc_fractions)} values for {patients} patients")
    summaries = []
    with atomic_folder(Path(out), overwrite=overwrite, kind="synthetic slides") as partial:
        roots = [partial, partial / KAGGLE_DUPLICATE_FOLDER] if doubled else [partial]
        for number in range(patients):
            wanted = None if idc_fractions is None else idc_fractions[number]
            slide = generate_slide(first_index + number, seed, idc_fraction=wanted)
            counts = [0, 0, 0]
            for name, pixels in slide.patches():
                encoded = _png_bytes(pixels)
                for root in roots:
                    folder = root / name.patient / str(name.label)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / patch_file_name(name.patient, name.x, name.y, name.label)).write_bytes(encoded)
                counts[0] += 1
                counts[1] += name.label
                counts[2] += pixels.shape[:2] != (PATCH_SIZE, PATCH_SIZE)
            summaries.append(SyntheticSlideSummary(slide.patient, *counts))
            progress("synthesizing", number + 1, patients)
        provenance = {
            "synthetic": True,
            "generator": "histoscreen.data.synthetic",
            "seed": seed,
            "first_index": first_index,
            "doubled": doubled,
            "slides": [s.__dict__ for s in summaries],
        }
        # A hidden file: `prepare` skips it, so it never shows up as a reject.
        (partial / ".histoscreen-synthetic.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return summaries


def _smooth_field(rng: np.random.Generator, height: int, width: int, *, cell: int, stretch: int = 1) -> np.ndarray:
    """Smooth random noise with features about `cell` px wide, unit variance."""
    coarse = rng.standard_normal((height // cell + 3, (width // cell + 3) * stretch)).astype(np.float32)
    field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    values = np.asarray(field, dtype=np.float32)
    return (values - values.mean()) / (values.std() + 1e-6)


def _points_in(rng: np.random.Generator, mask: np.ndarray, *, per_pixel: float) -> np.ndarray:
    """Random points inside `mask`, about `per_pixel` of them per masked pixel."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.empty((0, 2))
    chosen = rng.choice(rows.size, size=max(1, int(rows.size * per_pixel)), replace=False)
    return np.stack([rows[chosen], cols[chosen]], axis=1).astype(np.float64)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
