"""The packed patch store: every patch in one memory-mapped uint8 array, plus an index.

Layout of a store folder:
  patches.npy    N x 50 x 50 x 3 uint8, RGB, edge patches padded with white
  index.parquet  one row per patch: patient, x, y, label, width, height, source
  store.json     counts and provenance
  rejects.csv    files that were not valid patches, with the reason
  conflicts.csv  duplicate copies that disagreed in label or pixels
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.errors import InputError
from histoscreen.jsontext import read_json_text
from histoscreen.constants import COORD_ORIGIN, GRID_STEP, MAX_SLIDE_PX, PATCH_SIZE
from histoscreen.data.naming import check_slide_id, patient_sort_key

if TYPE_CHECKING:
    import pandas as pd

STORE_FORMAT = "histoscreen-patch-store"
STORE_VERSION = 1
PATCHES_FILE = "patches.npy"
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "store.json"
REJECTS_FILE = "rejects.csv"
CONFLICTS_FILE = "conflicts.csv"
INDEX_COLUMNS = ("patient", "x", "y", "label", "width", "height", "source")


class PatchStore:
    """A prepared store, opened read-only; `patches` is memory-mapped, not loaded."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise InputError(f"{self.path}: not a patch store (no {MANIFEST_FILE}; run 'histoscreen prepare')")
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{manifest_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        self.manifest = read_json_text(text, manifest_path, error=InputError, what="store manifest")
        if not isinstance(self.manifest, dict):
            raise InputError(f"{manifest_path}: a store manifest is a JSON object, this is a {type(self.manifest).__name__}")
        if self.manifest.get("format") != STORE_FORMAT or self.manifest.get("version") != STORE_VERSION:
            raise InputError(
                f"{manifest_path}: store format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r} is not {STORE_FORMAT!r} version {STORE_VERSION}"
            )
        for name in (PATCHES_FILE, INDEX_FILE):
            if not (self.path / name).is_file():
                raise InputError(f"{self.path}: store is missing {name}")
        try:
            self.patches: np.ndarray = np.load(self.path / PATCHES_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
            raise InputError(f"{self.path / PATCHES_FILE}: unreadable or damaged ({error or 'empty'})") from None
        import pandas as pd  # here: screening a slide file needs no store, nor pandas' start-up

        try:
            self.index: pd.DataFrame = pd.read_parquet(self.path / INDEX_FILE)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"{self.path / INDEX_FILE}: unreadable or damaged ({error})") from None
        expected_shape = (len(self.index), PATCH_SIZE, PATCH_SIZE, 3)
        if self.patches.shape != expected_shape or self.patches.dtype != np.uint8:
            raise InputError(
                f"{self.path}: {PATCHES_FILE} holds {self.patches.dtype} {self.patches.shape}, "
                f"expected uint8 {expected_shape} to match {INDEX_FILE}"
            )
        missing = set(INDEX_COLUMNS) - set(self.index.columns)
        if missing:
            raise InputError(f"{self.path}: {INDEX_FILE} lacks columns {sorted(missing)}")
        self._check_index()

    def _check_index(self) -> None:
        """Every value that later becomes a path, a grid cell or a call is checked here, once:
        a store is a file anyone can hand over, and its patient ids name report folders."""
        import pandas as pd

        index = self.index
        index["patient"] = index["patient"].astype("string")
        bad_ids = [p for p in index["patient"].unique().tolist() if check_slide_id(p) is not None]
        if bad_ids:
            raise InputError(f"{self.path / INDEX_FILE}: patient {bad_ids[0]!r} {check_slide_id(bad_ids[0])}")
        for column, low, high in (("x", 1, MAX_SLIDE_PX), ("y", 1, MAX_SLIDE_PX), ("label", 0, 1),
                                  ("width", 1, PATCH_SIZE), ("height", 1, PATCH_SIZE)):
            values = index[column]
            if not pd.api.types.is_integer_dtype(values):
                raise InputError(f"{self.path / INDEX_FILE}: column {column} holds {values.dtype}, not whole numbers")
            outside = (values < low) | (values > high)
            if outside.any():
                raise InputError(f"{self.path / INDEX_FILE}: {column} = {values[outside].iloc[0]} lies outside {low}..{high:,}")
        repeated = index.duplicated(["patient", "x", "y"], keep=False)
        if repeated.any():
            row = index[repeated].iloc[0]
            raise InputError(f"{self.path / INDEX_FILE}: {int(repeated.sum()):,} rows share a place, e.g. patient {row['patient']} "
                             f"x={row['x']}, y={row['y']}; a store holds each place once (prepare it again)")
        off_grid = ((index["x"] - COORD_ORIGIN) % GRID_STEP != 0) | ((index["y"] - COORD_ORIGIN) % GRID_STEP != 0)
        if off_grid.any():
            row = index[off_grid].iloc[0]
            raise InputError(f"{self.path / INDEX_FILE}: patch x={row['x']}, y={row['y']} is not on the {GRID_STEP}-px grid")

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, patches={len(self)}, patients={len(self.patients)})"

    @property
    def patients(self) -> list[str]:
        return sorted(self.index["patient"].unique().tolist(), key=patient_sort_key)

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy(dtype=np.int64)

    def rows_of(self, patients: Iterable[str]) -> np.ndarray:
        """Row numbers of every patch of the given patients, in store order."""
        wanted = set(patients)
        return np.flatnonzero(self.index["patient"].isin(wanted).to_numpy())

    def patient_table(self) -> pd.DataFrame:
        """Per patient: patch count and IDC patch count, the input to stratified splits."""
        import pandas as pd

        grouped = self.index.groupby("patient", observed=True)["label"]
        table = pd.DataFrame({"patches": grouped.size(), "idc_patches": grouped.sum().astype(int)})
        return table.reset_index()
