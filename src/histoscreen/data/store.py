"""The packed patch store: every patch in one memory-mapped uint8 array, plus an index.

Layout of a store folder:
  patches.npy    N x 50 x 50 x 3 uint8, RGB, edge patches padded with white
  index.parquet  one row per patch: patient, x, y, label, width, height, source
  store.json     counts and provenance
  rejects.csv    files that were not valid patches, with the reason
  conflicts.csv  duplicate copies that disagreed in label or pixels
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from histoscreen.errors import InputError
from histoscreen.constants import PATCH_SIZE
from histoscreen.data.naming import patient_sort_key

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
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{manifest_path}: unreadable ({error})") from None
        if self.manifest.get("format") != STORE_FORMAT or self.manifest.get("version") != STORE_VERSION:
            raise InputError(
                f"{manifest_path}: store format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r} is not {STORE_FORMAT!r} version {STORE_VERSION}"
            )
        for name in (PATCHES_FILE, INDEX_FILE):
            if not (self.path / name).is_file():
                raise InputError(f"{self.path}: store is missing {name}")
        self.patches: np.ndarray = np.load(self.path / PATCHES_FILE, mmap_mode="r", allow_pickle=False)
        self.index: pd.DataFrame = pd.read_parquet(self.path / INDEX_FILE)
        expected_shape = (len(self.index), PATCH_SIZE, PATCH_SIZE, 3)
        if self.patches.shape != expected_shape or self.patches.dtype != np.uint8:
            raise InputError(
                f"{self.path}: {PATCHES_FILE} holds {self.patches.dtype} {self.patches.shape}, "
                f"expected uint8 {expected_shape} to match {INDEX_FILE}"
            )
        missing = set(INDEX_COLUMNS) - set(self.index.columns)
        if missing:
            raise InputError(f"{self.path}: {INDEX_FILE} lacks columns {sorted(missing)}")

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
        grouped = self.index.groupby("patient", observed=True)["label"]
        table = pd.DataFrame({"patches": grouped.size(), "idc_patches": grouped.sum().astype(int)})
        return table.reset_index()
