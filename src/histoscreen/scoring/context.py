"""Slide context: a patch's score is blended with those of its neighbours on the slide.

IDC grows in contiguous nests, while the patch classifier's mistakes are mostly isolated
(a stray lymphocyte cluster, a fold, a stain blotch). So a patch's calibrated logit is
moved towards the mean calibrated logit of the patches present within `radius` grid steps
of it (a (2r+1) x (2r+1) window, the patch itself left out):

    mixed = logit + weight * (neighbour_mean - logit)     (unchanged without neighbours)

then recalibrated (temperature, bias) and thresholded. Only patches of the same patient
are neighbours; a patch whose name gives no position has none. Radius and weight are
chosen on the val patients, like the threshold (see `scoring.calibration.fit_scoring`).
"""

from __future__ import annotations

import numpy as np

from histoscreen.data.sources import SlidePositions

CONTEXT_RADII = (1, 2, 3)
CONTEXT_WEIGHTS = (0.25, 0.5, 0.7, 0.85)


def neighbour_means(logits: np.ndarray, positions: SlidePositions, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the mean logit of the other patches within `radius` cells of it on its
    slide, and how many there are (mean 0 where there are none)."""
    sums = np.zeros(len(logits))
    counts = np.zeros(len(logits))
    known_rows = np.flatnonzero(positions.known)
    patients = positions.slides[known_rows]
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
