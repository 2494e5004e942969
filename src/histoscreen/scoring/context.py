"""Slide context: a patch's score is blended with those of its neighbours on the slide.

IDC grows in contiguous nests, while the patch classifier's mistakes are mostly isolated
(a stray lymphocyte cluster, a fold, a stain blotch). So a patch's calibrated logit is
moved towards the mean calibrated logit of the patches present within `radius` grid steps
of it (a (2r+1) x (2r+1) window, the patch itself left out):

    mixed = logit + weight * (neighbour_mean - logit)     (unchanged without neighbours)

then recalibrated (temperature, bias) and thresholded. Only patches of the same patient
are neighbours; a patch whose name gives no position has none. Radius and weight are
chosen on the val patients, like the threshold (see `scoring.calibration.fit_scoring`).

The learned context (`ContextSettings.linear`) replaces the blend by a logistic regression,
also fitted on val patients, over `context_features`: the patch's logit, its neighbours'
mean logit and how many there are at five radii out to 8 grid steps (400 µm at 2.5x), the
highest and lowest neighbour and the spread of the 5 x 5 window, and where the patch's
slide as a whole lies (median, 10th and 90th percentile logit, mean probability). The wide
radii let a patch inside a broad tumour region be carried by it, and the slide's own
distribution puts each patch against the rest of its slide. It separated new patients'
patches better than the blend in the patient-grouped CV (model card). A patch whose name
gives no place keeps its own score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoscreen.data.grid import CellIndex, SlidePositions
from histoscreen.scoring.settings import ContextSettings
from histoscreen.scoring.metrics import sigmoid

CONTEXT_RADII = (1, 2, 3)
CONTEXT_WEIGHTS = (0.25, 0.5, 0.7, 0.85)
LEARNED_RADII = (1, 2, 3, 5, 8)
SPREAD_RADIUS = 2
CONTEXT_FEATURES = (
    "logit",
    *(f"{name} r{radius}" for radius in LEARNED_RADII for name in ("neighbour mean", "neighbour share")),
    "highest neighbour r1", "lowest neighbour r1", f"spread r{SPREAD_RADIUS}",
    "slide median", "slide 10th percentile", "slide 90th percentile", "slide mean probability",
)


@dataclass
class Neighbourhood:
    """Per patch, over the other patches within `radius` cells of it on its slide: how many
    there are, and the sum, sum of squares, highest and lowest of their logits (the highest
    and lowest are -inf and +inf where there are none)."""

    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    highest: np.ndarray
    lowest: np.ndarray

    @property
    def means(self) -> np.ndarray:
        """0 where there are no neighbours."""
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)


def neighbourhoods(logits: np.ndarray, positions: SlidePositions, radii: tuple[int, ...]) -> dict[int, Neighbourhood]:
    """The `Neighbourhood` of every patch at each radius, in one pass over the offsets of the
    largest. A cell named twice (an archive's duplicate) counts once, with the value of its
    last patch. Cells are looked up, not laid out: memory follows the patches, not the
    slides' extent.
    """
    size, radii = len(logits), tuple(sorted(set(radii)))
    found = {r: Neighbourhood(np.zeros(size), np.zeros(size), np.zeros(size), np.full(size, -np.inf), np.full(size, np.inf))
             for r in radii}
    known = np.flatnonzero(positions.known)
    if not len(known):
        return found
    _, slides = np.unique(positions.slides[known].astype(str), return_inverse=True)
    largest = max(radii)
    cells = CellIndex(positions.rows[known], positions.columns[known], slides, margin=largest)
    value = logits[known[cells.item_of_cell]].astype(np.float64)
    per_cell = {r: [np.zeros(len(cells)) for _ in range(3)] + [np.full(len(cells), -np.inf), np.full(len(cells), np.inf)]
                for r in radii}
    for row_step in range(-largest, largest + 1):
        for column_step in range(-largest, largest + 1):
            if not (row_step or column_step):
                continue
            neighbour = cells.neighbour_cells(row_step, column_step)
            present = np.flatnonzero(neighbour >= 0)
            seen = value[neighbour[present]]
            for radius in radii:
                if max(abs(row_step), abs(column_step)) <= radius:
                    counts, sums, squares, highest, lowest = per_cell[radius]
                    counts[present] += 1
                    sums[present] += seen
                    squares[present] += seen * seen
                    highest[present] = np.maximum(highest[present], seen)
                    lowest[present] = np.minimum(lowest[present], seen)
    for radius in radii:
        target = found[radius]
        for name, cell_values in zip(("counts", "sums", "squares", "highest", "lowest"), per_cell[radius]):
            getattr(target, name)[known] = cell_values[cells.cell_of_item]
    return found


def neighbour_means(logits: np.ndarray, positions: SlidePositions, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the mean logit of the other patches within `radius` cells of it on its
    slide (0 where there are none), and how many there are."""
    around = neighbourhoods(logits, positions, (radius,))[radius]
    return around.means, around.counts


def context_features(logits: np.ndarray, positions: SlidePositions) -> np.ndarray:
    """N x len(CONTEXT_FEATURES): what the learned context sees of each patch (see the top of
    this module). Calibrated logits in, so 0 is even odds. A patch without neighbours has
    its own logit for their mean and 0 for the rest; a patch whose place is unknown is a
    slide of its own."""
    logits = np.asarray(logits, dtype=np.float64)
    around = neighbourhoods(logits, positions, (*LEARNED_RADII, SPREAD_RADIUS))
    columns = [logits]
    for radius in LEARNED_RADII:
        near = around[radius]
        columns += [np.where(near.counts > 0, near.means, logits), near.counts / ((2 * radius + 1) ** 2 - 1)]
    adjacent = around[1]
    has_adjacent = adjacent.counts > 0
    columns += [np.where(has_adjacent, adjacent.highest, 0.0), np.where(has_adjacent, adjacent.lowest, 0.0)]
    window = around[SPREAD_RADIUS]  # the spread of the window takes in the patch itself
    count, total, squares = window.counts + 1, window.sums + logits, window.squares + logits * logits
    columns.append(np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0)))
    # a smooth share of IDC (the mean probability, not the share above even odds) keeps a
    # slide of one patch from jumping as its logit crosses 0
    slide_statistics = np.column_stack([logits, logits, logits, sigmoid(logits)])
    known = np.flatnonzero(positions.known)
    _, slide_of = np.unique(positions.slides[known].astype(str), return_inverse=True)
    by_slide = known[np.argsort(slide_of, kind="stable")]
    for rows in np.split(by_slide, np.cumsum(np.bincount(slide_of))[:-1]) if len(known) else []:
        own = logits[rows]
        slide_statistics[rows] = [np.median(own), *np.quantile(own, [0.1, 0.9]), np.mean(sigmoid(own))]
    return np.column_stack([*columns, slide_statistics])


def learned_context(
    logits: np.ndarray, positions: SlidePositions, linear: tuple[float, ...], features: np.ndarray | None = None
) -> np.ndarray:
    """The learned context's logit: the features (`context_features`, computed here unless
    given) weighed by `linear` (intercept last). A patch whose place is unknown has no slide
    to be seen in: it keeps its own logit."""
    features = context_features(logits, positions) if features is None else features
    weights = np.asarray(linear, dtype=np.float64)
    learned = features @ weights[:-1] + weights[-1]
    return np.where(positions.known, learned, logits)


def with_context(settings: ContextSettings, logits: np.ndarray, positions: SlidePositions) -> np.ndarray:
    """Calibrated patch logits with their slide context, as `settings` say: the learned
    context where it has weights, else the blend. Still to be put on the context's own
    calibration."""
    if settings.linear is not None:
        return learned_context(logits, positions, settings.linear)
    return blend_with_neighbours(logits, positions, settings.radius, settings.weight)


def blend_with_neighbours(logits: np.ndarray, positions: SlidePositions, radius: int, weight: float) -> np.ndarray:
    means, counts = neighbour_means(logits, positions, radius)
    return np.where(counts > 0, logits + weight * (means - logits), logits)
