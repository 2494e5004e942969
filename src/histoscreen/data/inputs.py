"""The one place that tells a packed store from a folder of patches from a whole-slide
image file, and opens each as a PatchSource."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histoscreen.data.patch_files import find_files
from histoscreen.data.sources import FileSource, PatchSource, StoreSource, patient_folders
from histoscreen.data.store import MANIFEST_FILE, PatchStore
from histoscreen.data.wsi import TissueSettings, WholeSlideSource, is_slide_file
from histoscreen.errors import HistoscreenError, InputError
from histoscreen.problems import Problem


@dataclass(frozen=True)
class SlideReading:
    """How whole-slide images are cut into tiles: the model's µm/px, the slide's own (`mpp`)
    when its metadata lacks it (or is wrong), and how tissue is found."""

    spacing_um_px: float
    mpp: float | None = None
    tissue: TissueSettings = field(default_factory=TissueSettings)


def open_sources(
    inputs: Sequence[str | os.PathLike],
    *,
    named_only: bool = True,
    workers: int | None = None,
    slides: SlideReading | None = None,
) -> list[PatchSource]:
    """Each store is a source of its own, and so is each whole-slide image (one slide per
    file, found directly or in folders); all patch folders and files together make one
    FileSource, so a patch present in two of them is still read once. A slide file that
    cannot be opened is a problem of the last source, never the end of the batch.
    """
    if not inputs:
        raise InputError("no input given")
    sources: list[PatchSource] = []
    files: list[str] = []
    folders: list[Path] = []
    empty_folders: list[Path] = []
    problems: list[Problem] = []
    slide_files: list[str] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            sources.append(StoreSource(PatchStore(path)))
        elif path.is_dir():
            found, listing_problems = find_files(path)
            if not found and not listing_problems:
                raise InputError(f"{path}: the folder holds no files")
            slide_files += [f for f in found if is_slide_file(f)]
            files += [f for f in found if not is_slide_file(f)]
            problems += listing_problems
            folders.append(path)
            empty_folders += patient_folders(path)
        elif is_slide_file(path):
            slide_files.append(os.fspath(path))
        else:
            files.append(os.fspath(path))
    for slide_file in slide_files:
        if slides is None:
            problems.append(Problem(slide_file, "a whole-slide image, but no model resolution was given to tile it"))
            continue
        try:
            sources.append(WholeSlideSource(slide_file, spacing_um_px=slides.spacing_um_px, mpp=slides.mpp,
                                            tissue=slides.tissue, workers=workers))
        except HistoscreenError as error:
            problems.append(Problem(slide_file, str(error).removeprefix(f"{slide_file}: ")))
    if files or problems or not sources:
        description = ", ".join(str(f) for f in folders) or f"{len(files)} files"
        sources.append(FileSource(files, description=description, named_only=named_only, workers=workers,
                                  empty_folders=empty_folders, listing_problems=problems))
    return sources
