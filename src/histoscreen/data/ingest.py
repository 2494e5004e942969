"""`prepare`: turn a folder of Kaggle-layout patch PNGs into a packed patch store.

The source may be the Kaggle archive root (which holds every patch twice), the
IDC_regular_ps50_idx5 folder alone, one patient folder, or a loose folder of patches.
Patches are deduplicated by (patient, x, y), decoded in worker processes straight into a
memory-mapped array, and the store is published atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from histoscreen import __version__
from histoscreen.atomic import atomic_folder, check_output_folder
from histoscreen.constants import PATCH_SIZE
from histoscreen.data.patch_files import find_files
from histoscreen.data.sources import Conflict, FileSource, PatchBatch
from histoscreen.problems import Problem
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
from histoscreen.errors import InputError
from histoscreen.progress import Progress, silent
from histoscreen.tables import write_csv


@dataclass
class PrepareSummary:
    out: Path
    files_seen: int
    patches: int
    patients: int
    per_class: dict[int, int]
    duplicates: int
    rejects: list[Problem] = field(default_factory=list)
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


class StrictModeError(InputError):
    """`strict` was asked for and some files were rejected or disagreed."""


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
        raise InputError(f"{source}: no such folder")
    if not source.is_dir():
        raise InputError(f"{source}: not a folder (prepare reads a folder of patch PNGs)")
    check_output_folder(out, overwrite=overwrite, inputs=[source])
    files, listing_problems = find_files(source)
    if not files and not listing_problems:
        raise InputError(f"{source}: the folder holds no files")
    patch_source = FileSource(files, description=str(source), workers=workers, listing_problems=listing_problems)
    upper_bound = len(patch_source)

    with atomic_folder(out, overwrite=overwrite, inputs=[source], kind="patch store") as partial:
        patches = np.lib.format.open_memmap(
            partial / PATCHES_FILE, mode="w+", dtype=np.uint8, shape=(upper_bound, PATCH_SIZE, PATCH_SIZE, 3)
        )
        _reserve_disk_space(partial / PATCHES_FILE)
        # Patches come in slide order (patient, then row, then column), so a slide's
        # patches sit together on disk.
        parts, filled = [], 0
        for batch in patch_source.batches(batch_size=1024):
            patches[filled : filled + len(batch)] = batch.pixels
            parts.append(batch.without_pixels())
            filled += len(batch)
            progress("decoding", filled, upper_bound)
        rejects, conflicts = patch_source.problems, patch_source.conflicts
        if strict and (rejects or conflicts):
            problems = [f"{r.where}: {r.reason}" for r in rejects[:5]]
            problems += [f"{c.other_path}: disagrees with {c.kept_path}" for c in conflicts[:5]]
            raise StrictModeError(
                f"strict: {len(rejects)} rejected files and {len(conflicts)} conflicting duplicates; "
                "first: " + "; ".join(problems)
            )
        if not filled:
            example = f" (e.g. {rejects[0].where}: {rejects[0].reason})" if rejects else ""
            raise InputError(f"{source}: none of {len(files)} files is a valid patch{example}")
        if filled < upper_bound:
            patches = _truncate(partial / PATCHES_FILE, patches, filled)
        patches.flush()
        del patches

        kept = PatchBatch.concatenate(parts)
        index = pd.DataFrame(
            {
                "patient": pd.array(kept.patients.tolist(), dtype="string"),
                "x": kept.xs.astype(np.int32),
                "y": kept.ys.astype(np.int32),
                "label": kept.labels.astype(np.int8),
                "width": kept.widths.astype(np.int16),
                "height": kept.heights.astype(np.int16),
                "source": pd.array(kept.paths.tolist(), dtype="string"),
            }
        )
        index.to_parquet(partial / INDEX_FILE, index=False)
        write_csv(partial / REJECTS_FILE, ["path", "reason"], [(r.where, r.reason) for r in rejects])
        write_csv(
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
            duplicates=patch_source.duplicates,
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
            "duplicates_dropped": summary.duplicates,
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


def _reserve_disk_space(path: Path) -> None:
    """Claim the memory-mapped file's blocks now: a full disk is then an error here, not a
    SIGBUS that kills the process when a page is first written."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))


def _truncate(path: Path, patches: np.memmap, count: int) -> np.memmap:
    """Keep the first `count` patches (fewer than listed: every copy of some was rejected),
    streaming to keep memory flat."""
    compacted_path = path.with_name("compacted-" + path.name)
    compacted = np.lib.format.open_memmap(compacted_path, mode="w+", dtype=np.uint8, shape=(count, *patches.shape[1:]))
    for start in range(0, count, 4096):
        compacted[start : start + 4096] = patches[start : min(start + 4096, count)]
    compacted.flush()
    del patches
    os.replace(compacted_path, path)
    return compacted
