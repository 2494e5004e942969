"""The steps an engine runs, the same in this process and on a Ray actor: scoring one
source's batches (predict) and screening one slide (screen). `predict`, `Screening` and
tasks/ray_engine.py all import them from here, so no task imports another's module back.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoscreen.constants import COORD_ORIGIN, GRID_STEP, PATCH_SIZE
from histoscreen.data.annotations import label_cells, read_annotations
from histoscreen.data.naming import grid_index
from histoscreen.data.sources import NO_LABEL, PatchBatch, PatchSource
from histoscreen.errors import InputError, ModelError
from histoscreen.problems import Problem
from histoscreen.progress import Progress, silent
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.explain import explanation_maps
from histoscreen.tasks.slides import MosaicCanvas, SlideGrid, SlideSummary, summarise_slide, uncertain_patches


def scored_batches(predictor: Predictor, source: PatchSource) -> Iterator[tuple[np.ndarray, PatchBatch]]:
    """Each batch of a source with its raw logits, its pixels dropped once scored."""
    for batch in source.batches(batch_size=predictor.batch_size):
        yield predictor.patch_logits(batch.pixels), batch.without_pixels()


EXPLAINED_PER_KIND = 4


@dataclass(frozen=True)
class Explanation:
    """A patch shown to the pathologist with its evidence map (tasks/explain.py)."""

    row: int  # index of the patch in its slide
    kind: str  # "most suspicious" or "uncertain"
    pixels: np.ndarray  # 50 x 50 x 3
    evidence: np.ndarray  # 50 x 50 in [0, 1]: how much hiding each part lowers the IDC score


@dataclass
class SlideResult:
    """One screened slide: where its patches are (their pixels were dropped once scored),
    the calibrated probability and call of each, its picture, and what a pathologist reads
    off them."""

    slide: PatchBatch  # places, sizes and labels of every patch scored; no pixels
    grid: SlideGrid
    mosaic: np.ndarray  # the slide's picture over the grid, shrunk `reduction` times
    reduction: int
    probabilities: np.ndarray
    uncertain: np.ndarray  # bool per patch: near the threshold, or dihedral views disagree
    views_disagree: np.ndarray  # bool per patch (always False without TTA)
    threshold: float
    summary: SlideSummary
    explanations: list[Explanation]
    level0_per_grid_px: float = 1.0  # slide pixels per grid pixel (whole-slide images: level 0)
    level0_size: tuple[int, int] | None = None  # the slide file's (width, height)
    reading: dict = field(default_factory=dict)  # how the source read it (whole-slide images)

    @property
    def patient(self) -> str:
        return self.summary.patient

    @property
    def calls(self) -> np.ndarray:
        return self.probabilities >= self.threshold


def with_truth(batch: PatchBatch, truth: dict[tuple[str, int, int], int] | None, use_name_labels: bool = True) -> np.ndarray:
    """The labels of a batch's patches: the label files' where they give one, else the
    names' (unless `use_name_labels` is off), else none."""
    names = batch.labels if use_name_labels else np.full(len(batch), NO_LABEL)
    if not truth:
        return np.asarray(names, dtype=np.int64)
    return np.array([truth.get((str(p), int(x), int(y)), int(n)) for p, x, y, n in zip(batch.patients, batch.xs, batch.ys, names)],
                    dtype=np.int64)


def read_truth(paths: Sequence[str | os.PathLike], slides: Sequence[tuple[PatchSource, str]]) -> dict[tuple[str, int, int], int]:
    """Ground truth from label files: CSVs with columns patient,x,y,label, and GeoJSON
    annotations (QuPath's, histoscreen's edited regions) each named after the slide it labels
    (SLIDE.geojson), read on that slide's grid. A cell no file labels has no label."""
    truth: dict[tuple[str, int, int], int] = {}
    by_id = {slide_id: source for source, slide_id in slides}
    for path in map(Path, paths):
        if path.suffix.lower() not in (".geojson", ".json"):
            truth.update(read_labels_csv(path))
            continue
        source = by_id.get(path.stem)
        if source is None:
            raise InputError(f"{path}: no slide {path.stem!r} among the inputs; annotations label the slide named like the file")
        xs, ys = source.cells(path.stem)
        size = source.level0_size or (int((xs.max() - COORD_ORIGIN + GRID_STEP) * source.level0_per_grid_px),
                                      int((ys.max() - COORD_ORIGIN + GRID_STEP) * source.level0_per_grid_px))
        labels = label_cells(read_annotations(path), xs, ys, level0_per_grid_px=source.level0_per_grid_px,
                             level0_size=size, where=str(path))
        truth.update({(path.stem, int(x), int(y)): int(label) for x, y, label in zip(xs, ys, labels) if label != NO_LABEL})
    return truth


def read_labels_csv(path: str | os.PathLike) -> dict[tuple[str, int, int], int]:
    """Ground truth from a CSV with columns patient,x,y,label (label 0 or 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"patient", "x", "y", "label"} <= set(reader.fieldnames):
                raise InputError(f"{path}: needs columns patient,x,y,label")
            for line, row in enumerate(reader, start=2):
                try:
                    label = int(row["label"])
                    key = (row["patient"].strip(), int(row["x"]), int(row["y"]))
                except (ValueError, TypeError, AttributeError):
                    raise InputError(f"{path}, line {line}: x, y and label must be whole numbers") from None
                if label not in (0, 1):
                    raise InputError(f"{path}, line {line}: label must be 0 or 1, got {label}")
                labels[key] = label
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:  # a field past the csv module's 128 KiB limit, a NUL byte
        raise InputError(f"{path}: not a readable CSV ({error})") from None
    return labels


@dataclass(frozen=True)
class SlideOptions:
    """What screening a slide needs besides the model and the patches; the same here and on a
    Ray worker."""

    truth: dict[tuple[str, int, int], int] | None = None  # from a labels CSV
    use_name_labels: bool = True
    patch_um_per_px: float | None = None  # of patch inputs (a slide file's grid knows its own)
    explained_per_kind: int = EXPLAINED_PER_KIND


def screen_slide(
    predictor: Predictor, options: SlideOptions, source: PatchSource, slide_id: str, progress: Progress = silent
) -> SlideResult | Problem:
    """One slide screened, or the problem that stopped it: one broken slide must not stop the batch."""
    try:
        result = _screen_slide(predictor, options, source, slide_id, progress)
    except ModelError:
        raise  # the model, not the slide: every slide would fail the same way
    except Exception as error:
        return Problem(slide_id, f"screening failed: {type(error).__name__}: {error}")
    return result if result is not None else Problem(slide_id, "slide has no readable patches")


def _screen_slide(
    predictor: Predictor, options: SlideOptions, source: PatchSource, slide_id: str, progress: Progress
) -> SlideResult | None:
    """Score one slide batch by batch (the pixels of a batch are dropped once it is scored
    and painted into the slide's picture), then judge every patch with its neighbours and
    summarise the slide. Memory follows the batch, not the slide."""
    xs, ys = source.cells(slide_id)
    if not len(xs):
        return None
    canvas = MosaicCanvas(SlideGrid.from_cells(grid_index(ys), grid_index(xs)))
    parts, logits, disagree = [], [], []
    for batch in source.batches(batch_size=predictor.batch_size, slides=[slide_id]):
        batch_logits, batch_disagree = predictor.patch_logits_with_disagreement(batch.pixels)
        logits.append(batch_logits)
        disagree.append(batch_disagree)
        canvas.paint(batch)
        parts.append(batch.without_pixels())
        progress(f"slide {slide_id}", sum(len(part) for part in parts), len(xs))
    slide = PatchBatch.concatenate(parts)
    if not len(slide):
        return None
    slide.labels = with_truth(slide, options.truth, options.use_name_labels)
    disagree = np.concatenate(disagree)
    probabilities = predictor.finish(np.concatenate(logits), slide.positions)
    grid = SlideGrid.of(slide, origin=(canvas.origin[0] // GRID_STEP, canvas.origin[1] // GRID_STEP))
    threshold = predictor.threshold
    summary = summarise_slide(
        slide_id, grid, probabilities, threshold, views_disagree=disagree,
        labels=slide.labels if slide.has_labels else None,
        um_per_px=source.grid_um_per_px if source.grid_um_per_px is not None else options.patch_um_per_px,
    )
    uncertain = uncertain_patches(probabilities, threshold, disagree)
    suspicious = np.argsort(-probabilities)[: options.explained_per_kind]
    doubtful = [i for i in np.argsort(np.abs(probabilities - threshold)) if uncertain[i] and i not in suspicious]
    chosen = [(int(i), "most suspicious") for i in suspicious] + [(int(i), "uncertain") for i in doubtful[: options.explained_per_kind]]
    rows = [row for row, _ in chosen]
    pixels = _explained_pixels(source, slide_id, slide, grid, canvas, np.asarray(rows, dtype=np.int64))
    maps = explanation_maps(predictor, pixels)
    explanations = [Explanation(row, kind, patch, evidence) for (row, kind), patch, evidence in zip(chosen, pixels, maps)]
    return SlideResult(slide, grid, canvas.image(), canvas.reduction, probabilities, uncertain, disagree, threshold, summary,
                       explanations, source.level0_per_grid_px, source.level0_size, source.settings())


def _explained_pixels(source: PatchSource, slide_id: str, slide: PatchBatch, grid: SlideGrid, canvas: MosaicCanvas,
                      rows: np.ndarray) -> np.ndarray:
    """The pixels of the patches to explain, cut from the slide's picture where it holds them
    whole (drawn at full resolution, a full 50-px patch that stands for its cell), so a tile
    is read once; the others (a picture too large to draw at full resolution, a short edge
    patch, a cell named twice) are read again from the source."""
    xs, ys = slide.xs[rows], slide.ys[rows]
    whole = (slide.heights[rows] == PATCH_SIZE) & (slide.widths[rows] == PATCH_SIZE)
    whole &= grid.cells.item_of_cell[grid.cells.cell_of_item[rows]] == rows
    cut = canvas.cut(xs[whole], ys[whole])
    if cut is None:
        return source.read_cells(slide_id, xs, ys)
    pixels = np.empty((len(rows), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    pixels[whole] = cut
    if not whole.all():
        pixels[~whole] = source.read_cells(slide_id, xs[~whole], ys[~whole])
    return pixels
