"""What a pathologist reads off a slide's probabilities: tumour burden, connected IDC
regions, uncertain patches, the triage order, and region outlines for QuPath.

A slide's patches sit on a grid of 50-px cells. Everything here works on the cells that are
present (looked up through a CellIndex), never on an array the size of the slide's bounding
box: a patch named far from the others costs no more than any other.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from histoscreen.constants import BACKGROUND_RGB, COORD_ORIGIN, GRID_STEP, PATCH_SIZE
from histoscreen.data.grid import CellIndex
from histoscreen.data.sources import PatchBatch

# A patch whose calibrated probability lies this close to the threshold is shown to a
# person rather than trusted either way.
UNCERTAIN_MARGIN = 0.1

# A rebuilt slide is drawn at full resolution up to this many pixels (about 6000 x 6000);
# beyond it, at the largest whole fraction of it that fits (a real slide at the Kaggle set's
# 2.5x never gets there; a far-off stray patch would).
MOSAIC_MAX_PIXELS = 36_000_000
MOSAIC_REDUCTIONS = (1, 2, 5, 10, 25, 50)  # divisors of the patch size


@dataclass(frozen=True)
class SlideGrid:
    """The cells of one slide's patches. `columns` and `rows` (per patch) count from
    `origin`, the slide's top-left cell present; `extent` is rows x columns spanned."""

    columns: np.ndarray
    rows: np.ndarray
    origin: tuple[int, int]  # (column, row)
    extent: tuple[int, int]
    cells: CellIndex = field(compare=False, repr=False)

    @classmethod
    def from_cells(cls, rows: np.ndarray, columns: np.ndarray, origin: tuple[int, int] | None = None) -> SlideGrid:
        """The grid of these cells; `origin` (column, row), when given, must not lie right of
        or below any of them (a picture drawn from a larger set of cells fixes it)."""
        rows, columns = np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)
        first_column, first_row = origin if origin is not None else (int(columns.min()), int(rows.min()))
        columns, rows = columns - first_column, rows - first_row
        extent = (int(rows.max()) + 1, int(columns.max()) + 1)
        return cls(columns, rows, (first_column, first_row), extent, CellIndex(rows, columns, margin=1))

    @classmethod
    def of(cls, slide: PatchBatch, origin: tuple[int, int] | None = None) -> SlideGrid:
        return cls.from_cells(slide.rows, slide.columns, origin)

    @property
    def pixel_origin(self) -> tuple[int, int]:
        """Slide pixel (x, y) of the grid's top-left corner."""
        return self.origin[0] * GRID_STEP, self.origin[1] * GRID_STEP

    def representatives(self) -> np.ndarray:
        """One patch per cell (the last, where a cell was named twice)."""
        return self.cells.item_of_cell


def mosaic_reduction(grid: SlideGrid) -> int:
    """By how much a slide's picture is shrunk when drawn (1: full resolution)."""
    height, width = grid.extent[0] * GRID_STEP, grid.extent[1] * GRID_STEP
    return next((r for r in MOSAIC_REDUCTIONS if (height // r) * (width // r) <= MOSAIC_MAX_PIXELS), MOSAIC_REDUCTIONS[-1])


class MosaicCanvas:
    """The picture of a slide, painted patch by patch as batches stream past (each patch
    averaged down to 50/`reduction` px), so the patches themselves need not be kept."""

    def __init__(self, grid: SlideGrid, reduction: int | None = None):
        self.reduction = reduction or mosaic_reduction(grid)
        self.origin = grid.pixel_origin
        size = PATCH_SIZE // self.reduction
        shape = (grid.extent[0] * size, grid.extent[1] * size, 3)
        # a grey background fills at memset speed; a coloured one broadcasts (4x slower on a
        # whole slide's canvas)
        grey = len(set(BACKGROUND_RGB)) == 1
        self._pixels = np.full(shape, BACKGROUND_RGB[0], dtype=np.uint8) if grey else np.empty(shape, dtype=np.uint8)
        if not grey:
            self._pixels[:] = BACKGROUND_RGB
        self._bottom = self._right = 0

    def paint(self, batch: PatchBatch) -> None:
        reduction, size = self.reduction, PATCH_SIZE // self.reduction
        patches = batch.pixels
        if reduction > 1:  # the whole batch at once: a patch at a time cost a second a slide
            blocks = patches.reshape(len(patches), size, reduction, size, reduction, 3)
            patches = np.round(blocks.sum(axis=(2, 4), dtype=np.uint32) / reduction**2).astype(np.uint8)
        tops = (batch.ys - COORD_ORIGIN - self.origin[1]) // reduction
        lefts = (batch.xs - COORD_ORIGIN - self.origin[0]) // reduction
        heights, widths = -(-batch.heights // reduction), -(-batch.widths // reduction)
        for pixels, top, left, h, w in zip(patches, tops.tolist(), lefts.tolist(), heights.tolist(), widths.tolist()):
            self._pixels[top : top + h, left : left + w] = pixels[:h, :w]
        if len(patches):
            self._bottom = max(self._bottom, int((tops + heights).max()))
            self._right = max(self._right, int((lefts + widths).max()))

    def cut(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
        """The painted pixels of the cells at `xs`, `ys` (as painted: the last patch of a cell,
        background past a short edge patch), or None when the picture is reduced."""
        if self.reduction != 1:
            return None
        tops = (np.asarray(ys) - COORD_ORIGIN - self.origin[1]).tolist()
        lefts = (np.asarray(xs) - COORD_ORIGIN - self.origin[0]).tolist()
        cells = [self._pixels[top : top + PATCH_SIZE, left : left + PATCH_SIZE] for top, left in zip(tops, lefts)]
        return np.stack(cells) if cells else np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)

    def image(self) -> np.ndarray:
        """The picture, cropped to the patches painted (edge patches may end short of their cell)."""
        return self._pixels[: self._bottom, : self._right]


def build_mosaic(slide: PatchBatch, grid: SlideGrid | None = None, reduction: int = 1) -> np.ndarray:
    """The slide as one RGB image over its grid: every patch at its place, background where
    none was cut; with `reduction` r, each patch is averaged down to 50/r px."""
    canvas = MosaicCanvas(grid or SlideGrid.of(slide), reduction)
    canvas.paint(slide)
    return canvas.image()


def uncertain_patches(probabilities: np.ndarray, threshold: float, views_disagree: np.ndarray | None = None) -> np.ndarray:
    """Patches to show a person: within UNCERTAIN_MARGIN of the threshold, or whose
    test-time views fall on both sides of it."""
    uncertain = np.abs(probabilities - threshold) < UNCERTAIN_MARGIN
    return uncertain | views_disagree if views_disagree is not None else uncertain


def connected_regions(grid: SlideGrid, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 4-connected regions of the cells whose patch is in `mask`: (label per cell
    of grid.cells, 0 outside every region, regions numbered in reading order; region count).

    4-connectivity: tumour touching only at a corner is counted as two foci.

    >>> grid = SlideGrid.from_cells(np.array([0, 0, 2, 2]), np.array([0, 1, 1, 2]))
    >>> connected_regions(grid, np.ones(4, dtype=bool))[1]
    2
    """
    cells = grid.cells
    inside = np.asarray(mask, dtype=bool)[cells.item_of_cell]
    neighbours = [cells.neighbour_cells(dr, dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    labels = np.zeros(len(cells), dtype=np.int64)
    count = 0
    for start in np.flatnonzero(inside):  # cells are sorted by key, that is in reading order
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            cell = stack.pop()
            for step in neighbours:
                other = step[cell]
                if other >= 0 and inside[other] and not labels[other]:
                    labels[other] = count
                    stack.append(other)
    return labels, count


def largest_region(grid: SlideGrid, mask: np.ndarray) -> int:
    """Cells in the largest 4-connected region of `mask` (0 when there is none)."""
    labels, count = connected_regions(grid, mask)
    return int(np.bincount(labels)[1:].max()) if count else 0


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
    grid: SlideGrid,
    probabilities: np.ndarray,
    threshold: float,
    *,
    views_disagree: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    um_per_px: float | None = None,
) -> SlideSummary:
    """Summary of one slide from the calibrated probability of each of its patches.

    `views_disagree` marks extra uncertain patches (test-time views on both sides of the
    threshold); patches within UNCERTAIN_MARGIN of it are always uncertain. `labels` holds
    the true label of every patch (0 or 1), when known. A cell named twice counts once.
    """
    kept = grid.representatives()
    probabilities = np.asarray(probabilities, dtype=np.float64)
    idc = probabilities >= threshold
    uncertain = uncertain_patches(probabilities, threshold, views_disagree)
    largest = largest_region(grid, idc)
    screened = len(kept)
    summary = SlideSummary(
        patient=patient,
        patches=screened,
        idc_patches=int(idc[kept].sum()),
        idc_fraction=float(idc[kept].sum() / max(screened, 1)),
        largest_region_patches=largest,
        largest_region_mm2=None if um_per_px is None else largest * (GRID_STEP * um_per_px / 1000.0) ** 2,
        confident_region_patches=largest_region(grid, idc & ~uncertain),
        mean_prob=float(probabilities[kept].mean()) if screened else 0.0,
        max_prob=float(probabilities[kept].max()) if screened else 0.0,
        uncertain=int(uncertain[kept].sum()),
    )
    if labels is not None:
        truth, called = np.asarray(labels)[kept] == 1, idc[kept]
        positives, negatives = int(truth.sum()), int((~truth).sum())
        summary.true_idc_patches = positives
        summary.true_idc_fraction = float(positives / max(screened, 1))
        summary.sensitivity = float((called & truth).sum() / positives) if positives else None
        summary.specificity = float((~called & ~truth).sum() / negatives) if negatives else None
        summary.agreement = float((called == truth).sum() / max(screened, 1))
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


def region_polygons(grid: SlideGrid, mask: np.ndarray, cell: int = GRID_STEP) -> list[list[list[tuple[int, int]]]]:
    """Outlines of the 4-connected regions of `mask`'s cells, in slide pixel coordinates.

    One polygon per region: its outer ring first, then its holes; each ring closed (first
    point repeated). The cell in grid column c and row r covers slide pixels
    [c*cell, (c+1)*cell) x [r*cell, (r+1)*cell).
    """
    labels, count = connected_regions(grid, mask)
    items = grid.cells.item_of_cell
    first_column, first_row = grid.origin
    polygons = []
    for region in range(1, count + 1):
        members = items[labels == region]
        rings = _trace_rings(list(zip((grid.rows[members] + first_row).tolist(), (grid.columns[members] + first_column).tolist())))
        rings.sort(key=lambda ring: -abs(_signed_area(ring)))  # the outer ring encloses the most
        polygons.append([[(int(x) * cell, int(y) * cell) for x, y in ring] for ring in rings])
    return polygons


def _trace_rings(cells: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Boundary rings of one region, given its (row, column) cells, by walking the cells'
    edges with the region on the right. Points are (x, y) in cells."""
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    edges = set()
    for r, c in cells:
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


def _scaled(point: tuple[int, int], scale: float, bounds: tuple[int, int] | None) -> list:
    """A grid point in the slide's pixels, kept inside the slide: clamping the corners of
    axis-aligned outlines clips them to the slide's edge (edge tiles reach beyond it)."""
    return [_scaled_coordinate(point[axis], scale, None if bounds is None else bounds[axis]) for axis in (0, 1)]


def _scaled_coordinate(value: int, scale: float, bound: int | None) -> float:
    scaled = value if scale == 1 else round(value * scale, 2)
    return scaled if bound is None else min(scaled, bound)


def level0_corners(xs: np.ndarray, ys: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-left corners of the cells named x, y (on the model's grid, 1-based) in the
    slide's level-0 pixels: the frame the GeoJSON is in and QuPath shows."""
    return (np.round((np.asarray(xs) - COORD_ORIGIN) * scale, 2), np.round((np.asarray(ys) - COORD_ORIGIN) * scale, 2))


def regions_geojson(
    grid: SlideGrid, mask: np.ndarray, probabilities: np.ndarray, patient: str, *, scale: float = 1.0,
    bounds: tuple[int, int] | None = None,
) -> dict:
    """IDC regions as QuPath annotations: a GeoJSON FeatureCollection of polygons in the
    slide's pixel coordinates (x to the right, y down, origin at the slide's top-left;
    `scale` slide pixels per grid pixel: level 0 of a whole-slide image)."""
    labels, _ = connected_regions(grid, mask)
    items = grid.cells.item_of_cell
    features = []
    for number, rings in enumerate(region_polygons(grid, mask), start=1):
        members = items[labels == number]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[_scaled(p, scale, bounds) for p in ring] for ring in rings]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "IDC", "color": [220, 40, 40]},
                    "name": f"{patient} IDC region {number}",
                    "patches": int(len(members)),
                    "mean_prob": float(np.mean(probabilities[members])),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def tiles_geojson(
    slide: PatchBatch, probabilities: np.ndarray, calls: np.ndarray, uncertain: np.ndarray, *, scale: float = 1.0,
    bounds: tuple[int, int] | None = None,
) -> dict:
    """Every scored patch as a QuPath detection (a square over its cell, in the slide's pixel
    coordinates) classified IDC or non-IDC, with its probability in `measurements`."""
    features = []
    # a slide's squares share a few hundred distinct corner coordinates: each is scaled once
    # (a third of the time of writing a whole slide's tiles)
    x_bound, y_bound = (None, None) if bounds is None else bounds
    x_of = functools.cache(lambda value: _scaled_coordinate(value, scale, x_bound))
    y_of = functools.cache(lambda value: _scaled_coordinate(value, scale, y_bound))
    for x, y, probability, call, doubt in zip(slide.xs.tolist(), slide.ys.tolist(), probabilities, calls, uncertain):
        left, top = x - COORD_ORIGIN, y - COORD_ORIGIN
        x0, x1, y0, y1 = x_of(left), x_of(left + GRID_STEP), y_of(top), y_of(top + GRID_STEP)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "IDC", "color": [220, 40, 40]} if call else {"name": "non-IDC", "color": [60, 140, 220]},
                "measurements": {"IDC probability": round(float(probability), 6), "uncertain": int(doubt)},
            },
        })
    return {"type": "FeatureCollection", "features": features}
