"""Slide context: a patch's score is blended with those of its neighbours on the slide.

IDC grows in contiguous nests, while the patch classifier's mistakes are mostly isolated
(a stray lymphocyte cluster, a fold, a stain blotch). So a patch's calibrated logit is
moved towards the mean calibrated logit of the patches present within `radius` grid steps
of it (a (2r+1) x (2r+1) window, the patch itself left out):

    mixed = logit + weight * (neighbour_mean - logit)     (unchanged without neighbours)

then recalibrated (temperature, bias) and thresholded. Only patches of the same patient
are neighbours; a patch whose name gives no position has none. Radius and weight are
chosen on the val patients, like the threshold (see `training.calibrate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoscreen.constants import COORD_ORIGIN, GRID_STEP

CONTEXT_RADII = (1, 2, 3)
CONTEXT_WEIGHTS = (0.25, 0.5, 0.7, 0.85)


@dataclass(frozen=True)
class SlidePositions:
    """Where each patch sits: its patient and grid cell; `known` is False where the name
    gave no position (such patches have no neighbours)."""

    patients: np.ndarray  # object array of patient ids ("" where unknown)
    columns: np.ndarray  # int64 grid column, x // GRID_STEP
    rows: np.ndarray  # int64 grid row
    known: np.ndarray  # bool

    @classmethod
    def of(cls, patients: Sequence[str | None], xs: Sequence[int | None], ys: Sequence[int | None]) -> SlidePositions:
        known = np.array([p is not None and p != "" and x is not None and y is not None for p, x, y in zip(patients, xs, ys)], dtype=bool)
        columns = np.array([(x - COORD_ORIGIN) // GRID_STEP if k else 0 for x, k in zip(xs, known)], dtype=np.int64)
        rows = np.array([(y - COORD_ORIGIN) // GRID_STEP if k else 0 for y, k in zip(ys, known)], dtype=np.int64)
        names = np.array([p if k else "" for p, k in zip(patients, known)], dtype=object)
        return cls(names, columns, rows, known)

    def __len__(self) -> int:
        return len(self.known)


def neighbour_means(logits: np.ndarray, positions: SlidePositions, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the mean logit of the other patches within `radius` cells of it on its
    slide, and how many there are (mean 0 where there are none)."""
    sums = np.zeros(len(logits))
    counts = np.zeros(len(logits))
    known_rows = np.flatnonzero(positions.known)
    patients = positions.patients[known_rows]
    for patient in np.unique(patients):
        members = known_rows[patients == patient]
        columns, rows = positions.columns[members], positions.rows[members]
        width, height = columns.max() + 1 + 2 * radius, rows.max() + 1 + 2 * radius
        value = np.zeros((height, width))
        present = np.zeros((height, width))
        # a position named twice (an archive's duplicate) counts once
        value[rows + radius, columns + radius] = logits[members]
        present[rows + radius, columns + radius] = 1.0
        window_sum = _box_sum(value, radius)
        window_count = _box_sum(present, radius)
        centre = (rows + radius, columns + radius)
        sums[members] = window_sum[centre] - value[centre]
        counts[members] = window_count[centre] - present[centre]
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return means, counts


def _box_sum(grid: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2r+1) x (2r+1) window around every cell (zero beyond the edge)."""
    padded = np.pad(grid, radius)
    table = padded.cumsum(0).cumsum(1)
    table = np.pad(table, ((1, 0), (1, 0)))
    size = 2 * radius + 1
    height, width = grid.shape
    return (
        table[size : size + height, size : size + width]
        - table[:height, size : size + width]
        - table[size : size + height, :width]
        + table[:height, :width]
    )


def blend_with_neighbours(logits: np.ndarray, positions: SlidePositions, radius: int, weight: float) -> np.ndarray:
    means, counts = neighbour_means(logits, positions, radius)
    return np.where(counts > 0, logits + weight * (means - logits), logits)
