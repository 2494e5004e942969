"""Slides rebuilt from their patches: grouping patches by patient and placing them on the grid."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscreen import HistoscreenError
from histoscreen.constants import BACKGROUND_RGB, COORD_ORIGIN, GRID_STEP
from histoscreen.data.naming import parse_patch_name, patient_sort_key
from histoscreen.data.patch_files import decode_files, find_files
from histoscreen.data.store import MANIFEST_FILE, PatchStore

NO_LABEL = -1


@dataclass
class ScreeningError:
    """Something that could not be screened: one file, or a whole slide."""

    where: str
    problem: str


@dataclass
class SlidePatches:
    """All readable patches of one slide, with their places on the 50-px grid."""

    patient: str
    pixels: np.ndarray  # n x 50 x 50 x 3 uint8, edge patches padded
    xs: np.ndarray  # 1-based slide coordinates, as in the names
    ys: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    labels: np.ndarray  # 0, 1, or NO_LABEL

    @property
    def columns(self) -> np.ndarray:
        return (self.xs - COORD_ORIGIN) // GRID_STEP

    @property
    def rows(self) -> np.ndarray:
        return (self.ys - COORD_ORIGIN) // GRID_STEP

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.rows.max()) + 1, int(self.columns.max()) + 1

    @property
    def has_labels(self) -> bool:
        return bool((self.labels != NO_LABEL).all())

    def grid(self, values: np.ndarray, empty: float = np.nan) -> np.ndarray:
        """Per-patch values laid out on the slide's grid (rows x columns); `empty` elsewhere."""
        layout = np.full(self.grid_shape, empty, dtype=np.float64)
        layout[self.rows, self.columns] = values
        return layout


def build_mosaic(slide: SlidePatches) -> np.ndarray:
    """The slide as one RGB image: every patch at its place, background where none was cut."""
    height = int((slide.ys - COORD_ORIGIN + slide.heights).max())
    width = int((slide.xs - COORD_ORIGIN + slide.widths).max())
    mosaic = np.empty((height, width, 3), dtype=np.uint8)
    mosaic[:] = BACKGROUND_RGB
    for pixels, x, y, w, h in zip(slide.pixels, slide.xs, slide.ys, slide.widths, slide.heights):
        top, left = y - COORD_ORIGIN, x - COORD_ORIGIN
        mosaic[top : top + h, left : left + w] = pixels[:h, :w]
    return mosaic


@dataclass
class SlideSource:
    """Where one slide's patches are; `load` reads them (only then are they in memory)."""

    patient: str
    store: PatchStore | None = None
    files: list[Path] | None = None

    def load(self, errors: list[ScreeningError], workers: int | None = None) -> SlidePatches | None:
        if self.store is not None:
            return _slide_of_store(self.store, self.patient)
        kept, pixels, widths, heights = [], [], [], []
        for chunk_paths, chunk in decode_files([(p, str(p)) for p in self.files or []], workers):
            for row, path in enumerate(chunk_paths):
                if chunk.reasons[row] is not None:
                    errors.append(ScreeningError(str(path), chunk.reasons[row]))
                    continue
                kept.append(parse_patch_name(path.name))
                pixels.append(chunk.pixels[row])
                widths.append(chunk.widths[row])
                heights.append(chunk.heights[row])
        if not kept:
            errors.append(ScreeningError(self.patient, "slide has no readable patches"))
            return None
        return SlidePatches(
            self.patient,
            np.stack(pixels),
            np.array([n.x for n in kept]),
            np.array([n.y for n in kept]),
            np.array(widths),
            np.array(heights),
            np.array([n.label for n in kept]),
        )


def find_slides(source: str | os.PathLike, errors: list[ScreeningError]) -> list[SlideSource]:
    """The slides in a packed store or a folder of named patches (one patient or many).

    Files whose names don't place them on a slide, and slide folders with no patch, are
    added to `errors`. The Kaggle archive's second copy of a patch is skipped.
    """
    source = Path(source)
    if not source.exists():
        raise HistoscreenError(f"{source}: no such file or folder")
    if source.is_dir() and (source / MANIFEST_FILE).is_file():
        store = PatchStore(source)
        return [SlideSource(patient, store=store) for patient in store.patients]
    if not source.is_dir():
        raise HistoscreenError(f"{source}: screen reads a folder of patches or a packed store")
    files = find_files(source)
    by_patient: dict[str, list[Path]] = defaultdict(list)
    seen: set[tuple[str, int, int]] = set()
    for path in files:
        name = parse_patch_name(path.name)
        if name is None:
            errors.append(ScreeningError(str(path), "name does not give patient and place (<patient>_idx5_x<X>_y<Y>_class<C>.png)"))
        elif name.key not in seen:
            seen.add(name.key)
            by_patient[name.patient].append(path)
    for folder in _slide_folders(source):
        if folder.name not in by_patient:
            errors.append(ScreeningError(str(folder), "slide folder holds no patches"))
    if not by_patient:
        raise HistoscreenError(f"{source}: no patch files named <patient>_idx5_x<X>_y<Y>_class<C>.png")
    return [SlideSource(p, files=by_patient[p]) for p in sorted(by_patient, key=patient_sort_key)]


def _slide_of_store(store: PatchStore, patient: str) -> SlidePatches:
    rows = store.rows_of([patient])
    part = store.index.iloc[rows]
    return SlidePatches(
        patient,
        np.asarray(store.patches[rows]),
        part["x"].to_numpy(),
        part["y"].to_numpy(),
        part["width"].to_numpy(),
        part["height"].to_numpy(),
        part["label"].to_numpy().astype(int),
    )


def _slide_folders(source: Path) -> list[Path]:
    """Patient folders (digit names) at the top of the source or of its doubled copy."""
    folders = []
    for parent in (source, source / "IDC_regular_ps50_idx5"):
        if parent.is_dir():
            folders += [p for p in parent.iterdir() if p.is_dir() and p.name.isdigit()]
    if source.name.isdigit():
        folders.append(source)
    return folders
