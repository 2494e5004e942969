"""Where patches sit on their slides: the 50-px grid, and fast look-ups of cells.

Nothing here allocates an array the size of a slide's bounding box: a grid is only the
cells present, so one patch named far from the others costs no more than any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoscreen.data.naming import grid_index

UNKNOWN_COORDINATE = -1
NO_SLIDE = ""  # the slide id of patches whose name gives no place


@dataclass(frozen=True)
class SlidePositions:
    """Where each patch sits: its slide and grid cell; `known` is False where the name gave
    no place (such patches have no neighbours)."""

    slides: np.ndarray  # object array of slide (patient) ids, NO_SLIDE where unknown
    columns: np.ndarray  # int64 grid column
    rows: np.ndarray  # int64 grid row
    known: np.ndarray  # bool

    @classmethod
    def of(cls, slides: Sequence[str] | np.ndarray, xs: Sequence[int] | np.ndarray, ys: Sequence[int] | np.ndarray) -> SlidePositions:
        """From slide ids and 1-based slide coordinates (UNKNOWN_COORDINATE where unknown)."""
        slides = np.asarray(slides, dtype=object)
        xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
        known = (slides != NO_SLIDE) & (xs != UNKNOWN_COORDINATE) & (ys != UNKNOWN_COORDINATE)
        return cls(
            np.where(known, slides, NO_SLIDE).astype(object),
            np.where(known, grid_index(xs), 0),
            np.where(known, grid_index(ys), 0),
            known,
        )

    @classmethod
    def unknown(cls, count: int) -> SlidePositions:
        return cls.of(np.full(count, NO_SLIDE, dtype=object), np.full(count, UNKNOWN_COORDINATE), np.full(count, UNKNOWN_COORDINATE))

    def __len__(self) -> int:
        return len(self.known)

    def take(self, rows: np.ndarray) -> SlidePositions:
        """The positions of some patches (a boolean mask or indices), in that order."""
        return SlidePositions(self.slides[rows], self.columns[rows], self.rows[rows], self.known[rows])


class CellIndex:
    """The distinct cells of items placed on one or more grids (`groups`, e.g. slides), with
    look-ups by cell and by neighbourhood.

    Where several items share a cell, the last one stands for it. Cells are kept as sorted
    integer keys, so memory grows with the items, never with the extent of the grids; a
    `margin` of empty cells around the items lets neighbourhoods reach past their edge.
    """

    def __init__(self, rows: np.ndarray, columns: np.ndarray, groups: np.ndarray | None = None, *, margin: int = 0):
        rows, columns = np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)
        groups = np.zeros(len(rows), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        empty = len(rows) == 0
        self._row_base = 0 if empty else int(rows.min()) - margin
        self._column_base = 0 if empty else int(columns.min()) - margin
        self._height = 1 if empty else int(rows.max()) - self._row_base + margin + 1
        self._width = 1 if empty else int(columns.max()) - self._column_base + margin + 1
        keys = self._keys(rows, columns, groups)
        # the last of several items on one cell stands for it: each key's last occurrence
        self.keys, first_in_reversed, inverse = np.unique(keys[::-1], return_index=True, return_inverse=True)
        self.item_of_cell = (len(keys) - 1 - first_in_reversed).astype(np.int64)
        self.cell_of_item = inverse[::-1].astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def _keys(self, rows: np.ndarray, columns: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return (groups * self._height + (rows - self._row_base)) * self._width + (columns - self._column_base)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        slots = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[slots] == keys, slots, -1)

    def neighbour_cells(self, row_step: int, column_step: int) -> np.ndarray:
        """For every cell, the cell `row_step` rows and `column_step` columns away, -1 where
        there is none. Steps must stay within the margin."""
        return self._lookup(self.keys + row_step * self._width + column_step)

    def find(self, rows: np.ndarray, columns: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """The item standing for each given cell, -1 where there is none."""
        rows, columns = np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)
        groups = np.zeros(len(rows), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        inside = (
            (rows >= self._row_base) & (rows < self._row_base + self._height)
            & (columns >= self._column_base) & (columns < self._column_base + self._width)
        )
        cells = np.where(inside, self._lookup(self._keys(rows, columns, groups)), -1)
        return np.where(cells >= 0, self.item_of_cell[np.maximum(cells, 0)], -1)
