"""`prepare`: turn a folder of Kaggle-layout patch PNGs into a packed patch store.

The source may be the Kaggle archive root (which holds every patch twice), the
IDC_regular_ps50_idx5 folder alone, one patient folder, or a loose folder of patches.
Patches are deduplicated by (patient, x, y), decoded in worker processes straight into a
memory-mapped array, and the store is published atomically.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from histoscreen import HistoscreenError, __version__
from histoscreen.atomic import atomic_folder
from histoscreen.constants import PATCH_SIZE
from histoscreen.data.naming import PatchName, patient_sort_key
from histoscreen.data.patch_files import check_name, decode_files, find_files
from histoscreen.data.store import (
    CONFLICTS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PATCHES_FILE,
    REJECTS_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    PatchStore,
)
from histoscreen.progress import Progress, silent

@dataclass(frozen=True)
class Reject:
    path: str
    reason: str


@dataclass(frozen=True)
class Conflict:
    """Two copies of one (patient, x, y) that disagree in label or pixels."""

    kept_path: str
    other_path: str
    labels_differ: bool
    pixels_differ: bool


@dataclass
class PrepareSummary:
    out: Path
    files_seen: int
    patches: int
    patients: int
    per_class: dict[int, int]
    duplicates: int
    rejects: list[Reject] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    padded: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.files_seen / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"store: {self.out}",
            f"patches: {self.patches:,} from {self.patients} patients "
            f"(non-IDC {self.per_class.get(0, 0):,}, IDC {self.per_class.get(1, 0):,}; "
            f"{self.padded:,} edge patches padded)",
            f"files read: {self.files_seen:,} in {self.seconds:.1f} s ({rate:,.0f} files/s)",
            f"duplicate copies dropped: {self.duplicates:,}",
            f"rejected files: {len(self.rejects):,}"
            + (f" (see {self.out / REJECTS_FILE})" if self.rejects else ""),
        ]
        if self.conflicts:
            lines.append(
                f"WARNING: {len(self.conflicts)} duplicate copies disagree in label or pixels "
                f"(see {self.out / CONFLICTS_FILE})"
            )
        return lines


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress = silent,
) -> PrepareSummary:
    """Scan `source` for patch PNGs and write a packed store to `out`.

    Files that are not valid patches are listed in `out/rejects.csv` with their reason;
    with `strict`, any reject or conflicting duplicate is an error and nothing is written.
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if not source.exists():
        raise HistoscreenError(f"{source}: no such folder")
    if not source.is_dir():
        raise HistoscreenError(f"{source}: not a folder (prepare reads a folder of patch PNGs)")
    if out.exists() and not overwrite:
        raise HistoscreenError(f"{out} already exists; choose another path or pass --overwrite")
    files = find_files(source)
    if not files:
        raise HistoscreenError(f"{source}: the folder holds no files")

    rejects: list[Reject] = []
    names: dict[Path, PatchName] = {}
    for path in files:
        name, reason = check_name(path)
        if name is None:
            rejects.append(Reject(str(path), reason or "invalid name"))
        else:
            names[path] = name

    # One slot per unique patch, in slide order (patient, then row, then column), so a
    # slide's patches sit together on disk. Copies are decoded in path order, which
    # puts the archive's top-level copy before its IDC_regular_ps50_idx5 twin.
    keys = sorted({n.key for n in names.values()}, key=lambda k: (patient_sort_key(k[0]), k[2], k[1]))
    slot_of_key = {key: slot for slot, key in enumerate(keys)}
    ordered = sorted(names, key=lambda p: (slot_of_key[names[p].key], str(p)))

    with atomic_folder(out, overwrite=overwrite) as partial:
        patches = np.lib.format.open_memmap(
            partial / PATCHES_FILE, mode="w+", dtype=np.uint8, shape=(len(keys), PATCH_SIZE, PATCH_SIZE, 3)
        )
        kept: list[tuple[Path, int, int, bytes] | None] = [None] * len(keys)
        conflicts: list[Conflict] = []
        duplicates = done = 0
        for paths, chunk in decode_files([(path, names[path].key) for path in ordered], workers):
            first_copies = []
            for row, path in enumerate(paths):
                if chunk.reasons[row] is not None:
                    rejects.append(Reject(str(path), chunk.reasons[row]))
                    continue
                slot = slot_of_key[names[path].key]
                first = kept[slot]
                if first is None:
                    kept[slot] = (path, chunk.widths[row], chunk.heights[row], chunk.digests[row])
                    first_copies.append((slot, row))
                    continue
                duplicates += 1
                labels_differ = names[first[0]].label != names[path].label
                pixels_differ = first[3] != chunk.digests[row]
                if labels_differ or pixels_differ:
                    conflicts.append(Conflict(str(first[0]), str(path), labels_differ, pixels_differ))
            if first_copies:
                slots, rows = zip(*first_copies)
                patches[list(slots)] = chunk.pixels[list(rows)]
            done += len(paths)
            progress("decoding", done, len(ordered))

        if strict and (rejects or conflicts):
            problems = [f"{r.path}: {r.reason}" for r in rejects[:5]]
            problems += [f"{c.other_path}: disagrees with {c.kept_path}" for c in conflicts[:5]]
            raise HistoscreenError(
                f"--strict: {len(rejects)} rejected files and {len(conflicts)} conflicting duplicates; "
                "first: " + "; ".join(problems)
            )
        filled = [slot for slot, entry in enumerate(kept) if entry is not None]
        if not filled:
            example = f" (e.g. {rejects[0].path}: {rejects[0].reason})" if rejects else ""
            raise HistoscreenError(f"{source}: none of {len(files)} files is a valid patch{example}")
        if len(filled) < len(keys):
            patches = _compact(partial / PATCHES_FILE, patches, filled)
        patches.flush()
        del patches

        index = pd.DataFrame(
            {
                "patient": pd.array([names[kept[s][0]].patient for s in filled], dtype="string"),
                "x": np.array([names[kept[s][0]].x for s in filled], dtype=np.int32),
                "y": np.array([names[kept[s][0]].y for s in filled], dtype=np.int32),
                "label": np.array([names[kept[s][0]].label for s in filled], dtype=np.int8),
                "width": np.array([kept[s][1] for s in filled], dtype=np.int16),
                "height": np.array([kept[s][2] for s in filled], dtype=np.int16),
                "source": pd.array([str(kept[s][0]) for s in filled], dtype="string"),
            }
        )
        index.to_parquet(partial / INDEX_FILE, index=False)
        _write_csv(partial / REJECTS_FILE, ["path", "reason"], [(r.path, r.reason) for r in rejects])
        _write_csv(
            partial / CONFLICTS_FILE,
            ["kept_path", "other_path", "labels_differ", "pixels_differ"],
            [(c.kept_path, c.other_path, int(c.labels_differ), int(c.pixels_differ)) for c in conflicts],
        )
        per_class = {int(k): int(v) for k, v in Counter(index["label"].tolist()).items()}
        summary = PrepareSummary(
            out=out,
            files_seen=len(files),
            patches=len(index),
            patients=int(index["patient"].nunique()),
            per_class=per_class,
            duplicates=duplicates,
            rejects=rejects,
            conflicts=conflicts,
            padded=int(((index["width"] < PATCH_SIZE) | (index["height"] < PATCH_SIZE)).sum()),
        )
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "patch_size": PATCH_SIZE,
            "patches": summary.patches,
            "patients": summary.patients,
            "per_class": {str(k): v for k, v in sorted(per_class.items())},
            "padded_edge_patches": summary.padded,
            "files_seen": summary.files_seen,
            "duplicates_dropped": duplicates,
            "rejects": len(rejects),
            "conflicts": len(conflicts),
            "source": str(source.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "histoscreen_version": __version__,
        }
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        PatchStore(partial)  # the store must open before it is published
    summary.seconds = time.perf_counter() - started
    return summary


def _compact(path: Path, patches: np.memmap, filled: list[int]) -> np.memmap:
    """Drop the slots whose every copy was rejected, streaming to keep memory flat."""
    compacted_path = path.with_name("compacted-" + path.name)
    compacted = np.lib.format.open_memmap(
        compacted_path, mode="w+", dtype=np.uint8, shape=(len(filled), *patches.shape[1:])
    )
    for start in range(0, len(filled), 4096):
        compacted[start : start + 4096] = patches[filled[start : start + 4096]]
    compacted.flush()
    del patches
    os.replace(compacted_path, path)
    return compacted


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
