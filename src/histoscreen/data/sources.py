"""Where patches come from: one reader for every kind of input.

A `PatchSource` yields batches of uint8 patches with their places on their slides
(`PatchBatch`), and collects every file it could not use as a `Problem`. `prepare`,
`predict`, `evaluate` and `screen` all read through it, so a folder, a packed store or a
list of files is walked, deduplicated and checked the same way everywhere; a whole-slide
tiler, a web upload or a Ray shard is one more source.

Slides are patients: the Kaggle set has one whole-mount slide per patient. Patches whose
file name gives no place (a loose `scan.png` handed to `predict`) belong to no slide.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoscreen.checks import whole_number
from histoscreen.constants import KAGGLE_DUPLICATE_FOLDER, PATCH_SIZE
from histoscreen.data.grid import NO_SLIDE, UNKNOWN_COORDINATE, SlidePositions
from histoscreen.data.naming import PatchName, grid_index, parse_patch_name, patient_sort_key
from histoscreen.data.patch_files import check_name, decode_files, find_files
from histoscreen.data.store import PatchStore
from histoscreen.errors import InputError
from histoscreen.problems import Problem

NO_LABEL = -1


@dataclass(frozen=True)
class Conflict:
    """Two copies of one (patient, x, y) that disagree in label or pixels; the first was kept."""

    kept_path: str
    other_path: str
    labels_differ: bool
    pixels_differ: bool

    def as_problem(self) -> Problem:
        differing = " and ".join(w for w, d in (("label", self.labels_differ), ("pixels", self.pixels_differ)) if d)
        return Problem(self.other_path, f"a second copy of {self.kept_path} with a different {differing}; the first copy was used")


@dataclass
class PatchBatch:
    """Patches travelling together from a source to the model, with where they came from."""

    pixels: np.ndarray  # n x 50 x 50 x 3 uint8, edge patches padded with background
    paths: np.ndarray  # object: the file (or store source) of each patch
    patients: np.ndarray  # object: slide id, NO_SLIDE where the name gives none
    xs: np.ndarray  # int64, 1-based slide coordinates as in the names; UNKNOWN_COORDINATE
    ys: np.ndarray
    widths: np.ndarray  # int64 true size of edge patches
    heights: np.ndarray
    labels: np.ndarray  # int64: 0, 1, or NO_LABEL

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def positions(self) -> SlidePositions:
        return SlidePositions.of(self.patients, self.xs, self.ys)

    @property
    def columns(self) -> np.ndarray:
        return grid_index(self.xs)

    @property
    def rows(self) -> np.ndarray:
        return grid_index(self.ys)

    @property
    def has_labels(self) -> bool:
        return bool(len(self)) and bool((self.labels != NO_LABEL).all())

    def take(self, rows: np.ndarray | slice) -> PatchBatch:
        return PatchBatch(*(getattr(self, name)[rows] for name in _BATCH_FIELDS))

    def without_pixels(self) -> PatchBatch:
        """The same batch with its pixels dropped: what to hold on to once patches are scored."""
        kept = {name: getattr(self, name) for name in _BATCH_FIELDS}
        kept["pixels"] = np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
        return PatchBatch(**kept)

    @staticmethod
    def concatenate(batches: Sequence[PatchBatch]) -> PatchBatch:
        if not batches:
            return PatchBatch.empty()
        return PatchBatch(*(np.concatenate([getattr(b, name) for b in batches]) for name in _BATCH_FIELDS))

    @staticmethod
    def empty() -> PatchBatch:
        return PatchBatch(
            np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8), np.empty(0, dtype=object), np.empty(0, dtype=object),
            *(np.empty(0, dtype=np.int64) for _ in range(5)),
        )


_BATCH_FIELDS = ("pixels", "paths", "patients", "xs", "ys", "widths", "heights", "labels")


class PatchSource(ABC):
    """Patches of one or more slides, read in batches, slide after slide.

    `problems` collects everything that could not be used, as it is found (some while
    listing, the rest while reading); `duplicates` counts copies of a patch folded into
    one, and `conflicts` the copies that disagreed.
    """

    description: str
    level0_per_grid_px: float = 1.0  # the slide's own pixels per grid pixel (whole-slide images: level 0)
    grid_um_per_px: float | None = None  # the grid's pixel size, when the source knows it
    level0_size: tuple[int, int] | None = None  # (width, height) of the slide file, outlines are kept inside

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.conflicts: list[Conflict] = []
        self.duplicates = 0

    @abstractmethod
    def slide_ids(self) -> list[str]:
        """The slides, in order (NO_SLIDE last, when some patches have no place)."""

    @abstractmethod
    def __len__(self) -> int:
        """How many patches reading will yield at most (bad files are fewer)."""

    @abstractmethod
    def batches(self, batch_size: int = 256, slides: Iterable[str] | None = None) -> Iterator[PatchBatch]:
        """Patches of `slides` (default: all), slide after slide, in batches of at most `batch_size`."""

    @abstractmethod
    def cells(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """1-based x and y of the patches a slide will yield, known before reading them
        (bad files may make it fewer)."""

    @abstractmethod
    def read_cells(self, slide_id: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The pixels of some patches of a slide again, by place (to explain them)."""

    def settings(self) -> dict:
        """How this source reads, for reports (whole-slide images say their resolution and tissue)."""
        return {}

    @abstractmethod
    def shard(self, slides: Sequence[str]) -> Shard:
        """The patches of `slides` as a shard another process can open: it yields what
        `batches(slides=slides)` yields here, in the same order."""

    def shards(self, patches_per_shard: int) -> list[Shard]:
        """The whole source cut into shards of whole slides, about `patches_per_shard` each,
        which yield in turn what `batches()` yields."""
        return [self.shard(group) for group in self._slide_groups(self.slide_ids(), patches_per_shard)]

    def _slide_groups(self, slides: Sequence[str], patches_per_shard: int) -> list[list[str]]:
        groups: list[list[str]] = [[]]
        size = 0
        for slide in slides:
            if size >= patches_per_shard:
                groups.append([])
                size = 0
            groups[-1].append(slide)
            size += len(self.cells(slide)[0])
        return [group for group in groups if group]

    def read_slide(self, slide_id: str) -> PatchBatch:
        """Every readable patch of one slide (empty when none could be read)."""
        return PatchBatch.concatenate(list(self.batches(batch_size=1 << 30, slides=[slide_id])))

    def read_all(self) -> PatchBatch:
        return PatchBatch.concatenate(list(self.batches(batch_size=1 << 30)))


class StoreSource(PatchSource):
    """The patches of a packed store, optionally only some patients', in store order."""

    def __init__(self, store: PatchStore, patients: Iterable[str] | None = None, rows: np.ndarray | None = None):
        super().__init__()
        self.store = store
        self.description = str(store.path)
        if rows is None:
            rows = store.rows_of(patients) if patients is not None else np.arange(len(store))
        self.rows = np.asarray(rows, dtype=np.int64)
        patient_column = store.index["patient"].to_numpy(dtype=object)
        self._patient_of_row = patient_column[self.rows]

    def slide_ids(self) -> list[str]:
        return sorted(set(self._patient_of_row.tolist()), key=patient_sort_key)

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int = 256, slides: Iterable[str] | None = None) -> Iterator[PatchBatch]:
        groups = [self.rows] if slides is None else [self.rows[self._patient_of_row == s] for s in slides]
        for rows in groups:
            for start in range(0, len(rows), batch_size):
                yield self._batch(rows[start : start + batch_size])

    def _rows_of(self, slide_id: str) -> np.ndarray:
        return self.rows[self._patient_of_row == slide_id]

    def shard(self, slides: Sequence[str]) -> Shard:
        return StoreShard(str(self.store.path), np.concatenate([self._rows_of(s) for s in slides]) if slides else self.rows[:0])

    def shards(self, patches_per_shard: int) -> list[Shard]:
        # store order, as batches() reads it: a shard is a run of rows, slides may straddle two
        return [StoreShard(str(self.store.path), self.rows[start : start + patches_per_shard])
                for start in range(0, len(self.rows), patches_per_shard)]

    def cells(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        part = self.store.index.iloc[self._rows_of(slide_id)]
        return part["x"].to_numpy(dtype=np.int64), part["y"].to_numpy(dtype=np.int64)

    def read_cells(self, slide_id: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        rows = self._rows_of(slide_id)
        part = self.store.index.iloc[rows]
        where = {(int(x), int(y)): row for x, y, row in zip(part["x"], part["y"], rows)}
        return np.stack([np.asarray(self.store.patches[where[(int(x), int(y))]]) for x, y in zip(xs, ys)]) if len(xs) else \
            np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)

    def _batch(self, rows: np.ndarray) -> PatchBatch:
        index = self.store.index
        part = index.iloc[rows]
        contiguous = len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1
        # a contiguous slice of the memory map reads sequentially; fancy indexing copies either way
        pixels = np.asarray(self.store.patches[rows[0] : rows[-1] + 1]) if contiguous else np.asarray(self.store.patches[rows])
        return PatchBatch(
            pixels,
            part["source"].to_numpy(dtype=object),
            part["patient"].to_numpy(dtype=object),
            part["x"].to_numpy(dtype=np.int64),
            part["y"].to_numpy(dtype=np.int64),
            part["width"].to_numpy(dtype=np.int64),
            part["height"].to_numpy(dtype=np.int64),
            part["label"].to_numpy(dtype=np.int64),
        )


@dataclass
class _Listing:
    """The files of one slide: every copy of each (x, y), in slide order (row, then column)."""

    copies: list[list[str]] = field(default_factory=list)


class FileSource(PatchSource):
    """Patch PNG files (from folders searched recursively, or listed one by one).

    Names are checked when listing (pattern, grid, agreement with the <patient>/<0|1>/
    folders); copies of one (patient, x, y), as the Kaggle archive holds, are decoded and
    compared, and only the first is yielded. With `named_only=False`, a PNG whose name
    gives no place is still read, as a patch of no slide (for `predict`).
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        *,
        description: str = "files",
        named_only: bool = True,
        workers: int | None = None,
        empty_folders: Sequence[Path] = (),
        listing_problems: Sequence[Problem] = (),
    ):
        super().__init__()
        if workers is not None:
            whole_number("workers", workers)
        self.problems += listing_problems
        self.description = description
        self.workers = workers
        self.named_only = named_only
        self.files_seen = len(files)
        names: dict[str, PatchName] = {}
        unnamed: list[str] = []
        for path in map(os.fspath, files):
            name, reason = check_name(path)
            if name is not None:
                names[path] = name
            elif not named_only and path.lower().endswith(".png") and parse_patch_name(os.path.basename(path)) is None:
                unnamed.append(path)
            else:
                self.problems.append(Problem(path, reason or "invalid name"))
        copies: dict[tuple[str, int, int], list[str]] = {}
        for path in sorted(names):  # the archive's top-level copy before its twin
            copies.setdefault(names[path].key, []).append(path)
        self._names = names
        self._slides: dict[str, _Listing] = {}
        for key in sorted(copies, key=lambda k: (patient_sort_key(k[0]), k[2], k[1])):
            self._slides.setdefault(key[0], _Listing()).copies.append(copies[key])
        if unnamed:
            self._slides[NO_SLIDE] = _Listing([[path] for path in unnamed])
        for folder in empty_folders:
            if folder.name not in self._slides:
                self.problems.append(Problem(str(folder), "slide folder holds no patches"))

    @classmethod
    def from_folder(cls, folder: Path, **options) -> FileSource:
        files, problems = find_files(folder)
        if not files and not problems:
            raise InputError(f"{folder}: the folder holds no files")
        return cls(files, description=str(folder), empty_folders=patient_folders(folder), listing_problems=problems, **options)

    def slide_ids(self) -> list[str]:
        return list(self._slides)

    def __len__(self) -> int:
        return sum(len(listing.copies) for listing in self._slides.values())

    def batches(self, batch_size: int = 256, slides: Iterable[str] | None = None) -> Iterator[PatchBatch]:
        chosen = self.slide_ids() if slides is None else list(slides)
        items = [
            (path, number)
            for slide in chosen
            for number, paths in enumerate(self._slides[slide].copies if slide in self._slides else [])
            for path in paths
        ]
        pending: list[tuple[str, np.ndarray, int, int]] = []
        first_copy: tuple[str, bytes] | None = None
        previous_key = None
        for paths, chunk in decode_files([(path, (self._key(path), number)) for path, number in items], self.workers):
            for row, path in enumerate(paths):
                key = self._key(path)
                if key != previous_key:
                    previous_key, first_copy = key, None
                reason = chunk.reasons[row]
                if reason is not None:
                    self.problems.append(Problem(path, reason))
                    continue
                if first_copy is not None and key is not None:
                    self._compare_copies(first_copy, path, chunk.digests[row])
                    continue
                first_copy = (path, chunk.digests[row])
                pending.append((path, chunk.pixels[row], chunk.widths[row], chunk.heights[row]))
                if len(pending) == batch_size:
                    yield self._batch(pending)
                    pending = []
        if pending:
            yield self._batch(pending)

    def cells(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        names = [self._names.get(paths[0]) for paths in self._slides[slide_id].copies] if slide_id in self._slides else []
        return (np.array([n.x if n else UNKNOWN_COORDINATE for n in names], dtype=np.int64),
                np.array([n.y if n else UNKNOWN_COORDINATE for n in names], dtype=np.int64))

    def read_cells(self, slide_id: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        wanted = {(int(x), int(y)) for x, y in zip(xs, ys)}
        copies = {(n.x, n.y): paths for paths in self._slides[slide_id].copies if (n := self._names.get(paths[0]))}
        found: dict[tuple[int, int], np.ndarray] = {}
        for paths, chunk in decode_files([(p, i) for i, key in enumerate(sorted(wanted)) for p in copies[key]], workers=1):
            for row, path in enumerate(paths):
                name = self._names[path]
                if chunk.reasons[row] is None and (name.x, name.y) not in found:
                    found[(name.x, name.y)] = chunk.pixels[row]
        return np.stack([found[(int(x), int(y))] for x, y in zip(xs, ys)]) if len(xs) else \
            np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)

    def shard(self, slides: Sequence[str]) -> Shard:
        files = [path for slide in slides for copies in self._slides[slide].copies for path in copies]
        return FileShard(tuple(files), self.named_only, self.description)

    def shards(self, patches_per_shard: int) -> list[Shard]:
        placed = [self.shard(group) for group in self._slide_groups([s for s in self.slide_ids() if s != NO_SLIDE], patches_per_shard)]
        # patches of no slide (last) have no neighbours to keep together: cut them like rows
        loose = [copies[0] for copies in self._slides[NO_SLIDE].copies] if NO_SLIDE in self._slides else []
        return placed + [FileShard(tuple(loose[start : start + patches_per_shard]), self.named_only, self.description)
                         for start in range(0, len(loose), patches_per_shard)]

    def _key(self, path: str) -> tuple[str, int, int] | None:
        name = self._names.get(path)
        return name.key if name is not None else None

    def _compare_copies(self, first: tuple[str, bytes], other: str, digest: bytes) -> None:
        self.duplicates += 1
        labels_differ = self._names[first[0]].label != self._names[other].label
        pixels_differ = first[1] != digest
        if labels_differ or pixels_differ:
            self.conflicts.append(Conflict(first[0], other, labels_differ, pixels_differ))

    def _batch(self, decoded: list[tuple[str, np.ndarray, int, int]]) -> PatchBatch:
        names = [self._names.get(path) for path, *_ in decoded]
        return PatchBatch(
            np.stack([pixels for _, pixels, _, _ in decoded]),
            np.array([path for path, *_ in decoded], dtype=object),
            np.array([n.patient if n else NO_SLIDE for n in names], dtype=object),
            np.array([n.x if n else UNKNOWN_COORDINATE for n in names], dtype=np.int64),
            np.array([n.y if n else UNKNOWN_COORDINATE for n in names], dtype=np.int64),
            np.array([w for *_, w, _ in decoded], dtype=np.int64),
            np.array([h for *_, h in decoded], dtype=np.int64),
            np.array([n.label if n else NO_LABEL for n in names], dtype=np.int64),
        )


class Shard(ABC):
    """A part of a source that a worker process, here or on another machine, opens by
    itself: paths and row numbers, never pixels, so it is cheap to send. Its files must be
    at the same path where it is opened (a shared file system on a cluster)."""

    @property
    @abstractmethod
    def patches(self) -> int:
        """How many patches it will yield at most."""

    @abstractmethod
    def open(self, workers: int | None = None) -> PatchSource:
        """The shard as a source; `workers` decoding processes where the source uses them."""


@functools.lru_cache(maxsize=8)
def _open_store(path: str) -> PatchStore:
    # a worker is sent many shards of one store: open (and validate) it once
    return PatchStore(path)


@dataclass(frozen=True, eq=False)
class StoreShard(Shard):
    store: str
    rows: np.ndarray

    @property
    def patches(self) -> int:
        return len(self.rows)

    def open(self, workers: int | None = None) -> PatchSource:
        return StoreSource(_open_store(self.store), rows=self.rows)


@dataclass(frozen=True)
class FileShard(Shard):
    files: tuple[str, ...]
    named_only: bool
    description: str

    @property
    def patches(self) -> int:
        return len(self.files)

    def open(self, workers: int | None = None) -> PatchSource:
        return FileSource(self.files, description=self.description, named_only=self.named_only, workers=workers)


def patient_folders(source: Path) -> list[Path]:
    """Patient folders: digit-named folders at the top of the source or of its doubled copy,
    or the source itself when it is one. Label folders (0/ and 1/) are not patients."""
    def is_patient_folder(path: Path) -> bool:
        return path.is_dir() and path.name.isdigit() and path.name not in ("0", "1")

    if is_patient_folder(source):
        return [source]
    folders = []
    for parent in (source, source / KAGGLE_DUPLICATE_FOLDER):
        if parent.is_dir():
            folders += sorted(p for p in parent.iterdir() if is_patient_folder(p))
    return folders
