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

from histoscreen.data.grid import CellIndex, SlidePositions

CONTEXT_RADII = (1, 2, 3)
CONTEXT_WEIGHTS = (0.25, 0.5, 0.7, 0.85)


def neighbour_means(logits: np.ndarray, positions: SlidePositions, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the mean logit of the other patches within `radius` cells of it on its
    slide, and how many there are (mean 0 where there are none). A cell named twice (an
    archive's duplicate) counts once, with the value of its last patch.

    Cells are looked up, not laid out: memory follows the patches, not the slides' extent.
    """
    sums = np.zeros(len(logits))
    counts = np.zeros(len(logits))
    known = np.flatnonzero(positions.known)
    if len(known):
        _, slides = np.unique(positions.slides[known].astype(str), return_inverse=True)
        cells = CellIndex(positions.rows[known], positions.columns[known], slides, margin=radius)
        value = logits[known[cells.item_of_cell]]
        cell_sums, cell_counts = np.zeros(len(cells)), np.zeros(len(cells))
        for row_step in range(-radius, radius + 1):
            for column_step in range(-radius, radius + 1):
                if row_step or column_step:
                    neighbour = cells.neighbour_cells(row_step, column_step)
                    present = neighbour >= 0
                    cell_sums[present] += value[neighbour[present]]
                    cell_counts[present] += 1
        sums[known] = cell_sums[cells.cell_of_item]
        counts[known] = cell_counts[cells.cell_of_item]
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return means, counts


def blend_with_neighbours(logits: np.ndarray, positions: SlidePositions, radius: int, weight: float) -> np.ndarray:
    means, counts = neighbour_means(logits, positions, radius)
    return np.where(counts > 0, logits + weight * (means - logits), logits)
