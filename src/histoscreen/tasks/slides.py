"""What a pathologist reads off a slide's probability map: tumour burden, connected IDC
regions, uncertain patches, the triage order, and region outlines for QuPath.

A slide's patches are laid on a grid of cells (one per 50-px patch). The grid spans only
the cells between the first and last patch present, so a slide cut far from its origin
costs no memory for the empty margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from histoscreen.constants import BACKGROUND_RGB, COORD_ORIGIN, GRID_STEP
from histoscreen.data.sources import PatchBatch


@dataclass(frozen=True)
class SlideGrid:
    """The cells of one slide's patches: `columns` and `rows` count from `origin`, the
    top-left cell present, in grid steps."""

    columns: np.ndarray
    rows: np.ndarray
    origin: tuple[int, int]  # (column, row) of the slide's top-left patch
    shape: tuple[int, int]  # rows x columns

    @classmethod
    def of(cls, slide: PatchBatch) -> SlideGrid:
        columns, rows = slide.columns, slide.rows
        first_column, first_row = int(columns.min()), int(rows.min())
        columns, rows = columns - first_column, rows - first_row
        return cls(columns, rows, (first_column, first_row), (int(rows.max()) + 1, int(columns.max()) + 1))

    def layout(self, values: np.ndarray, empty: float = np.nan) -> np.ndarray:
        """Per-patch values laid out on the grid (rows x columns); `empty` elsewhere."""
        layout = np.full(self.shape, empty, dtype=np.float64)
        layout[self.rows, self.columns] = values
        return layout

    @property
    def pixel_origin(self) -> tuple[int, int]:
        """Slide pixel (x, y) of the grid's top-left corner."""
        return self.origin[0] * GRID_STEP, self.origin[1] * GRID_STEP


def build_mosaic(slide: PatchBatch, grid: SlideGrid | None = None) -> np.ndarray:
    """The slide as one RGB image over its grid: every patch at its place, background where
    none was cut."""
    grid = grid or SlideGrid.of(slide)
    left, top = grid.pixel_origin
    height = int((slide.ys - COORD_ORIGIN - top + slide.heights).max())
    width = int((slide.xs - COORD_ORIGIN - left + slide.widths).max())
    mosaic = np.empty((height, width, 3), dtype=np.uint8)
    mosaic[:] = BACKGROUND_RGB
    for pixels, x, y, w, h in zip(slide.pixels, slide.xs, slide.ys, slide.widths, slide.heights):
        y0, x0 = y - COORD_ORIGIN - top, x - COORD_ORIGIN - left
        mosaic[y0 : y0 + h, x0 : x0 + w] = pixels[:h, :w]
    return mosaic

# A patch whose calibrated probability lies this close to the threshold is shown to a
# person rather than trusted either way.
UNCERTAIN_MARGIN = 0.1


def uncertain_patches(probabilities: np.ndarray, threshold: float, views_disagree: np.ndarray | None = None) -> np.ndarray:
    """Patches to show a person: within UNCERTAIN_MARGIN of the threshold, or whose
    test-time views fall on both sides of it. NaN (no patch) is never uncertain."""
    uncertain = np.abs(np.nan_to_num(probabilities, nan=np.inf) - threshold) < UNCERTAIN_MARGIN
    return uncertain | views_disagree if views_disagree is not None else uncertain


def connected_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 4-connected regions of True cells: (labels with 0 = background, region count).

    4-connectivity: tumour touching only at a corner is counted as two foci.

    >>> connected_regions(np.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=bool))[1]
    2
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    rows, columns = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < rows and 0 <= nc < columns and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = count
                    stack.append((nr, nc))
    return labels, count


def largest_region(mask: np.ndarray) -> int:
    """Cells in the largest 4-connected region of `mask` (0 when there is none)."""
    labels, count = connected_regions(mask)
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


@dataclass
class SlideSummary:
    patient: str
    patches: int
    idc_patches: int
    idc_fraction: float  # tumour burden: IDC patches / patches screened
    largest_region_patches: int
    largest_region_mm2: float | None  # only with a known pixel size
    confident_region_patches: int  # largest region of IDC patches that are not uncertain
    mean_prob: float
    max_prob: float
    uncertain: int
    rank: int = 0
    # with ground truth (labels in names, or --labels)
    true_idc_patches: int | None = None
    true_idc_fraction: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    agreement: float | None = None

    def as_row(self) -> dict:
        return asdict(self)


def summarise_slide(
    patient: str,
    probability_grid: np.ndarray,
    threshold: float,
    *,
    uncertain_grid: np.ndarray | None = None,
    truth_grid: np.ndarray | None = None,
    um_per_px: float | None = None,
) -> SlideSummary:
    """Summary of one slide from its probability grid (NaN where no patch was screened).

    `uncertain_grid` marks extra uncertain patches (e.g. test-time views that disagree);
    patches within UNCERTAIN_MARGIN of the threshold are always uncertain. `truth_grid`
    holds true labels (NaN where unknown).
    """
    screened = ~np.isnan(probability_grid)
    probabilities = probability_grid[screened]
    idc = screened & (np.nan_to_num(probability_grid, nan=-1.0) >= threshold)
    uncertain = screened & uncertain_patches(probability_grid, threshold, uncertain_grid)
    largest = largest_region(idc)
    summary = SlideSummary(
        patient=patient,
        patches=int(screened.sum()),
        idc_patches=int(idc.sum()),
        idc_fraction=float(idc.sum() / max(screened.sum(), 1)),
        largest_region_patches=largest,
        largest_region_mm2=None if um_per_px is None else largest * (GRID_STEP * um_per_px / 1000.0) ** 2,
        confident_region_patches=largest_region(idc & ~uncertain),
        mean_prob=float(probabilities.mean()) if probabilities.size else 0.0,
        max_prob=float(probabilities.max()) if probabilities.size else 0.0,
        uncertain=int(uncertain.sum()),
    )
    if truth_grid is not None and not np.isnan(truth_grid[screened]).any():
        truth = screened & (np.nan_to_num(truth_grid) == 1)
        positives, negatives = truth.sum(), (screened & ~truth).sum()
        summary.true_idc_patches = int(positives)
        summary.true_idc_fraction = float(positives / max(screened.sum(), 1))
        summary.sensitivity = float((idc & truth).sum() / positives) if positives else None
        summary.specificity = float((~idc & screened & ~truth).sum() / negatives) if negatives else None
        summary.agreement = float(((idc == truth) & screened).sum() / max(screened.sum(), 1))
    return summary


def rank_slides(summaries: list[SlideSummary]) -> list[SlideSummary]:
    """Most suspicious first: the largest confident IDC region, then burden, then peak probability."""
    ordered = sorted(
        summaries,
        key=lambda s: (-s.confident_region_patches, -s.idc_fraction, -s.max_prob, s.patient),
    )
    for rank, summary in enumerate(ordered, start=1):
        summary.rank = rank
    return ordered


def region_polygons(
    mask: np.ndarray, cell: int = GRID_STEP, origin: tuple[int, int] = (0, 0)
) -> list[list[list[tuple[int, int]]]]:
    """Outlines of the 4-connected regions of `mask`, in slide pixel coordinates.

    One polygon per region: its outer ring first, then its holes; each ring closed (first
    point repeated). Cell (row, column) covers pixels [x0 + column*cell, x0 + (column+1)*cell)
    x [y0 + row*cell, y0 + (row+1)*cell), with (x0, y0) = `origin`.
    """
    labels, count = connected_regions(mask)
    polygons = []
    for region in range(1, count + 1):
        rings = _trace_rings(labels == region)
        rings.sort(key=lambda ring: -abs(_signed_area(ring)))  # the outer ring encloses the most
        polygons.append([[(origin[0] + int(x) * cell, origin[1] + int(y) * cell) for x, y in ring] for ring in rings])
    return polygons


def _trace_rings(cells: np.ndarray) -> list[list[tuple[int, int]]]:
    """Boundary rings of one region by walking its cells' edges with the region on the right."""
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    edges = set()
    for r, c in zip(*np.nonzero(cells)):
        corners = [(c, r), (c + 1, r), (c + 1, r + 1), (c, r + 1)]
        for start, end in zip(corners, corners[1:] + corners[:1]):
            if (end, start) in edges:
                edges.discard((end, start))  # shared with a neighbouring cell: not boundary
            else:
                edges.add((start, end))
    for start, end in edges:
        outgoing.setdefault(start, []).append(end)
    rings = []
    while edges:
        first = min(edges)
        ring, (start, end) = [first[0]], first
        while True:
            edges.discard((start, end))
            outgoing[start].remove(end)
            ring.append(end)
            if end == ring[0] and not outgoing.get(end):
                break
            choices = outgoing[end]
            if len(choices) > 1:
                # two cells meet at a corner only: turn right, staying with the same cell,
                # so corner-touching cells are never joined (4-connectivity)
                dx, dy = end[0] - start[0], end[1] - start[1]
                right = (end[0] - dy, end[1] + dx)
                following = right if right in choices else choices[0]
            else:
                following = choices[0]
            start, end = end, following
        rings.append(_simplify(ring))
    return rings


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop points in the middle of straight runs; the ring stays closed."""
    points = ring[:-1]
    kept = [
        p for i, p in enumerate(points)
        if (points[i - 1][0] - p[0]) * (points[(i + 1) % len(points)][1] - p[1])
        != (points[i - 1][1] - p[1]) * (points[(i + 1) % len(points)][0] - p[0])
    ]
    return kept + kept[:1]


def _signed_area(ring: list[tuple[int, int]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def regions_geojson(mask: np.ndarray, probability_grid: np.ndarray, patient: str, origin: tuple[int, int] = (0, 0)) -> dict:
    """IDC regions as a GeoJSON FeatureCollection of polygons in slide pixel coordinates
    (x to the right, y down, origin at the slide's top-left), as QuPath imports them.
    `origin` is the slide pixel of the grid's top-left corner (SlideGrid.pixel_origin)."""
    labels, _ = connected_regions(mask)
    features = []
    for number, rings in enumerate(region_polygons(mask, origin=origin), start=1):
        inside = labels == number
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring] for ring in rings]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "IDC (predicted)", "color": [220, 40, 40]},
                    "name": f"{patient} IDC region {number}",
                    "patches": int(inside.sum()),
                    "mean_prob": float(np.nanmean(probability_grid[inside])),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
