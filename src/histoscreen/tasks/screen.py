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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscreen.constants import PATCH_NAME_HINT
from histoscreen.data.sources import NO_LABEL, PatchBatch, PatchSource, open_sources
from histoscreen.problems import Problem
from histoscreen.errors import InputError, SettingError
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.explain import grad_cam
from histoscreen.tasks.slides import UNCERTAIN_MARGIN, SlideGrid, SlideSummary, summarise_slide, uncertain_patches

EXPLAINED_PER_KIND = 4


@dataclass(frozen=True)
class Explanation:
    """A patch shown to the pathologist with its Grad-CAM map."""

    row: int  # index of the patch in its slide
    kind: str  # "most suspicious" or "uncertain"
    cam: np.ndarray  # 50 x 50 in [0, 1]


@dataclass
class SlideResult:
    """One screened slide: its patches (pixels, places, labels), the calibrated probability
    and call of each, and what a pathologist reads off them."""

    slide: PatchBatch
    grid: SlideGrid
    probabilities: np.ndarray
    uncertain: np.ndarray  # bool per patch: near the threshold, or dihedral views disagree
    views_disagree: np.ndarray  # bool per patch (always False without TTA)
    threshold: float
    summary: SlideSummary
    explanations: list[Explanation]

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
    return labels


class Screening:
    """The slides of `inputs` (Kaggle-layout folders, folders of named patches, stores),
    screened with one model when iterated over.

    `context` (blend each patch with its neighbours on the slide) defaults to on when the
    model has a slide-context calibration. Ground truth comes from `labels_csv`, else from
    the class in the file names unless `use_name_labels` is False.
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        model: str | os.PathLike | None = None,
        tta: bool = False,
        context: bool | None = None,
        um_per_px: float | None = None,
        labels_csv: str | os.PathLike | None = None,
        use_name_labels: bool = True,
        device: str = "auto",
        backend: str = "auto",
        workers: int | None = None,
        explained_per_kind: int = EXPLAINED_PER_KIND,
    ):
        if um_per_px is not None and not um_per_px > 0:
            raise SettingError("um_per_px", f"must be positive, got {um_per_px}")
        self.predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
        self.truth = read_labels_csv(labels_csv) if labels_csv else None
        self.use_name_labels = use_name_labels
        self.um_per_px = um_per_px
        self.explained_per_kind = explained_per_kind
        self.sources: list[PatchSource] = open_sources(inputs, named_only=True, workers=workers)
        self.slides = [(source, slide) for source in self.sources for slide in source.slide_ids()]
        if not self.slides:
            raise InputError(f"{', '.join(str(i) for i in inputs)}: no patch files named {PATCH_NAME_HINT}")
        self.failures: list[Problem] = []
        self.settings = {
            **self.predictor.settings(),
            "uncertain_margin": UNCERTAIN_MARGIN,
            "um_per_px": um_per_px,
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
        for source, slide_id in self.slides:
            try:
                slide = source.read_slide(slide_id)
                if len(slide) == 0:
                    self.failures.append(Problem(slide_id, "slide has no readable patches"))
                    continue
                result = self.screen_slide(slide)
            except Exception as error:  # one broken slide must not stop the batch
                self.failures.append(Problem(slide_id, f"screening failed: {type(error).__name__}: {error}"))
                continue
            yield result

    def screen_slide(self, slide: PatchBatch) -> SlideResult:
        """Score one slide (all its patches, with their places) and summarise it."""
        if self.truth is not None:
            slide.labels = np.array([self.truth.get((p, int(x), int(y)), NO_LABEL) for p, x, y in zip(slide.patients, slide.xs, slide.ys)])
        elif not self.use_name_labels:
            slide.labels = np.full(len(slide), NO_LABEL)
        predictor = self.predictor
        probabilities, disagree = predictor.probabilities_with_disagreement(slide.pixels, slide.positions)
        grid = SlideGrid.of(slide)
        threshold = predictor.threshold
        summary = summarise_slide(
            str(slide.patients[0]), grid, probabilities, threshold, views_disagree=disagree,
            labels=slide.labels if slide.has_labels else None, um_per_px=self.um_per_px,
        )
        uncertain = uncertain_patches(probabilities, threshold, disagree)
        suspicious = np.argsort(-probabilities)[: self.explained_per_kind]
        doubtful = [i for i in np.argsort(np.abs(probabilities - threshold)) if uncertain[i] and i not in suspicious]
        chosen = [(int(i), "most suspicious") for i in suspicious] + [(int(i), "uncertain") for i in doubtful[: self.explained_per_kind]]
        cams = grad_cam(predictor.model, slide.pixels[[i for i, _ in chosen]], predictor.metadata.normalisation)
        explanations = [Explanation(row, kind, cam) for (row, kind), cam in zip(chosen, cams)]
        return SlideResult(slide, grid, probabilities, uncertain, disagree, threshold, summary, explanations)
