"""`screen`: a batch of slides scored one at a time, each with its tumour burden, regions,
uncertain patches and explanations.

`Screening` computes; it writes nothing. Iterating over it screens the slides one after
another, so memory is bounded by the largest slide, not the batch; the report writer
(report.write_screening_report), a web handler or a Ray worker decides what to keep.
One unreadable patch or one broken slide becomes a problem, never the end of the batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from histoscreen import __version__
from histoscreen.constants import GRID_STEP, PATCH_NAME_HINT
from histoscreen.data.inputs import SlideReading, open_sources
from histoscreen.data.naming import grid_index
from histoscreen.data.sources import NO_LABEL, PatchBatch, PatchSource
from histoscreen.data.wsi import TissueSettings, check_pixel_size_setting
from histoscreen.problems import Problem
from histoscreen.progress import Progress, silent
from histoscreen.errors import InputError, ModelError
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.explain import explanation_maps
from histoscreen.tasks.ray_engine import RayEngine, RayPool
from histoscreen.tasks.slides import (
    UNCERTAIN_MARGIN,
    MosaicCanvas,
    SlideGrid,
    SlideSummary,
    summarise_slide,
    uncertain_patches,
)

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


class Screening:
    """The slides of `inputs` (Kaggle-layout folders, folders of named patches, stores,
    whole-slide image files or folders of them), screened with one model when iterated over.

    `context` (blend each patch with its neighbours on the slide) defaults to on when the
    model has a slide-context calibration. Ground truth comes from `labels_csv`, else from
    the class in the file names unless `use_name_labels` is False. `mpp` is the inputs' µm
    per pixel: a whole-slide image's level 0 (where its metadata lacks it or is wrong), or the
    patches' own (default: the model's spacing, 4 µm/px for the Kaggle set), for areas in mm².
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        model: str | os.PathLike | None = None,
        tta: bool = False,
        context: bool | None = None,
        labels_csv: str | os.PathLike | None = None,
        use_name_labels: bool = True,
        device: str = "auto",
        backend: str = "auto",
        workers: int | None = None,
        mpp: float | None = None,
        tissue: TissueSettings = TissueSettings(),
        explained_per_kind: int = EXPLAINED_PER_KIND,
        engine: RayEngine | None = None,
    ):
        check_pixel_size_setting("mpp", mpp)
        self.predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
        spacing = self.predictor.metadata.spacing_um_px
        patch_um_per_px = mpp if mpp is not None else spacing
        self.options = SlideOptions(read_labels_csv(labels_csv) if labels_csv else None, use_name_labels, patch_um_per_px, explained_per_kind)
        self.engine = engine
        reading = SlideReading(spacing, mpp, tissue)
        self.sources: list[PatchSource] = open_sources(inputs, named_only=True, workers=workers, slides=reading)
        self.failures: list[Problem] = []
        self.slides: list[tuple[PatchSource, str]] = []
        first_source: dict[str, PatchSource] = {}
        for source in self.sources:
            for slide in source.slide_ids():
                if slide in first_source:  # e.g. 9036.svs beside a folder of patient 9036's patches
                    self.failures.append(Problem(source.description, f"slide {slide} is also given by {first_source[slide].description}; "
                                                 "screened from that input only (a slide's id must be unique in a batch)"))
                    continue
                first_source[slide] = source
                self.slides.append((source, slide))
        if not self.slides:
            found = self.problems
            if found:  # say why the inputs gave nothing (a slide without a pixel size, say), not what was looked for
                more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
                raise InputError(f"nothing to screen: {found[0].where}: {found[0].reason}{more}")
            raise InputError(f"{', '.join(str(i) for i in inputs)}: no patch files named {PATCH_NAME_HINT}")
        self.settings = {
            **self.predictor.settings(),
            "histoscreen_version": __version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "uncertain_margin": UNCERTAIN_MARGIN,
            "mpp": mpp,
            "patch_um_per_px": patch_um_per_px,
            "inputs": [str(Path(i).resolve()) for i in inputs],
        }

    def __len__(self) -> int:
        return len(self.slides)

    @property
    def problems(self) -> list[Problem]:
        """Everything not screened so far: files, folders and slides, with the reason."""
        found = [p for s in self.sources for p in s.problems + [c.as_problem() for c in s.conflicts]]
        return found + self.failures

    def __iter__(self) -> Iterator[SlideResult]:
        return self.results()

    def results(self, progress: Progress = silent) -> Iterator[SlideResult]:
        """The slides screened one by one; `progress` hears of each slide's patches as they
        are scored (stage "slide ID"), with the local engine."""
        for outcome in self._outcomes(progress):
            if isinstance(outcome, Problem):
                self.failures.append(outcome)
            else:
                yield outcome

    def _outcomes(self, progress: Progress) -> Iterator[SlideResult | Problem]:
        if self.engine is None:
            for source, slide_id in self.slides:
                yield screen_slide(self.predictor, self.options, source, slide_id, progress)
            return
        with RayPool(self.engine, self.predictor, self.options) as pool:
            shards = [(source.shard([slide_id]), slide_id) for source, slide_id in self.slides]
            for (source, _), outcome in zip(self.slides, pool.map("screen", shards)):
                outcome.absorb_into(source)  # what reading the shard found, as if read here
                yield outcome.value


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
    if options.truth is not None:
        slide.labels = np.array([options.truth.get((p, int(x), int(y)), NO_LABEL) for p, x, y in zip(slide.patients, slide.xs, slide.ys)])
    elif not options.use_name_labels:
        slide.labels = np.full(len(slide), NO_LABEL)
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
    pixels = source.read_cells(slide_id, slide.xs[rows], slide.ys[rows])
    maps = explanation_maps(predictor, pixels)
    explanations = [Explanation(row, kind, patch, evidence) for (row, kind), patch, evidence in zip(chosen, pixels, maps)]
    return SlideResult(slide, grid, canvas.image(), canvas.reduction, probabilities, uncertain, disagree, threshold, summary,
                       explanations, source.level0_per_grid_px, source.level0_size, source.settings())
