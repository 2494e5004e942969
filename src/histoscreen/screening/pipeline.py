"""`screen`: a batch of slides in, a ranked, explained, self-contained report out.

Slides are read, predicted and drawn one at a time, so memory is bounded by the largest
slide, not the batch. One unreadable patch or one broken slide is reported, never fatal.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from histoscreen import HistoscreenError
from histoscreen.atomic import atomic_folder
from histoscreen.inference import Predictor, shipped_model_path
from histoscreen.models.checkpoint import load_metadata
from histoscreen.models.context import SlidePositions
from histoscreen.progress import Progress, silent
from histoscreen.screening.analysis import (
    UNCERTAIN_MARGIN,
    SlideSummary,
    rank_slides,
    regions_geojson,
    summarise_slide,
    uncertain_patches,
)
from histoscreen.screening.explain import grad_cam
from histoscreen.screening.render import THUMBNAIL_PX, explanation_figure, heatmap_image, save_png, shrink
from histoscreen.screening.report import write_index, write_slide_page
from histoscreen.screening.slides import NO_LABEL, ScreeningError, SlidePatches, build_mosaic, find_slides

EXPLAINED_PER_KIND = 4
SLIDE_COLUMNS = [
    "rank", "patient", "patches", "idc_patches", "idc_fraction", "largest_region_patches", "largest_region_mm2",
    "confident_region_patches", "mean_prob", "max_prob", "uncertain",
    "true_idc_patches", "true_idc_fraction", "sensitivity", "specificity", "agreement",
]


@dataclass
class ScreenResult:
    out: Path
    slides: list[SlideSummary]
    errors: list[ScreeningError] = field(default_factory=list)
    patches: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.patches / self.seconds if self.seconds else 0.0
        lines = [
            f"report: {self.out / 'index.html'}",
            f"slides: {len(self.slides)} screened, {self.patches:,} patches in {self.seconds:.1f} s ({rate:,.0f} patches/s)",
            f"problems: {len(self.errors)}" + (f" (see {self.out / 'errors.csv'})" if self.errors else ""),
        ]
        for summary in self.slides[:5]:
            lines.append(
                f"  #{summary.rank} {summary.patient}: burden {summary.idc_fraction:.1%}, "
                f"largest region {summary.largest_region_patches} patches, {summary.uncertain} uncertain"
            )
        return lines


def read_labels_csv(path: str | os.PathLike) -> dict[tuple[str, int, int], int]:
    """Ground truth from a CSV with columns patient,x,y,label (label 0 or 1)."""
    path = Path(path)
    if not path.is_file():
        raise HistoscreenError(f"{path}: no such labels file")
    labels = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"patient", "x", "y", "label"} <= set(reader.fieldnames):
            raise HistoscreenError(f"{path}: needs columns patient,x,y,label")
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
                key = (row["patient"].strip(), int(row["x"]), int(row["y"]))
            except ValueError:
                raise HistoscreenError(f"{path}, line {line}: x, y and label must be whole numbers") from None
            if label not in (0, 1):
                raise HistoscreenError(f"{path}, line {line}: label must be 0 or 1, got {label}")
            labels[key] = label
    return labels


def screen(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
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
    overwrite: bool = False,
    progress: Progress = silent,
) -> ScreenResult:
    """Screen every slide in `source` and write the report folder `out_dir`.

    `context` (blend each patch with its neighbours on the slide) defaults to on when the
    model has a slide-context calibration."""
    started = time.perf_counter()
    if um_per_px is not None and um_per_px <= 0:
        raise HistoscreenError(f"--um-per-px must be positive, got {um_per_px}")
    if context is None:
        context = bool(load_metadata(model if model is not None else shipped_model_path()).context)
    predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
    truth = read_labels_csv(labels_csv) if labels_csv else None
    errors: list[ScreeningError] = []
    slides = find_slides(source, errors)
    summaries: list[SlideSummary] = []
    patches = 0
    with atomic_folder(Path(out_dir), overwrite=overwrite) as partial:
        for number, slide_source in enumerate(slides, start=1):
            try:
                slide = slide_source.load(errors, workers)
                if slide is not None:
                    if truth is not None:
                        slide.labels = np.array([truth.get((slide.patient, int(x), int(y)), NO_LABEL) for x, y in zip(slide.xs, slide.ys)])
                    elif not use_name_labels:
                        slide.labels = np.full(len(slide.xs), NO_LABEL)
                    summaries.append(_screen_slide(slide, predictor, partial / "slides" / slide.patient, um_per_px))
                    patches += len(slide.xs)
            except Exception as error:  # one broken slide must not stop the batch
                errors.append(ScreeningError(slide_source.patient, f"screening failed: {type(error).__name__}: {error}"))
            progress("screening slides", number, len(slides))
        ranked = rank_slides(summaries)
        rows = [summary.as_row() for summary in ranked]
        with open(partial / "slides.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SLIDE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        settings = {
            **predictor.settings(),
            "uncertain_margin": UNCERTAIN_MARGIN,
            "um_per_px": um_per_px,
            "source": str(Path(source).resolve()),
        }
        (partial / "slides.json").write_text(json.dumps({"settings": settings, "slides": rows}, indent=2) + "\n")
        with open(partial / "errors.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["where", "problem"])
            writer.writerows((e.where, e.problem) for e in errors)
        for summary in ranked:
            write_slide_page(partial, summary, settings)
        write_index(partial, ranked, errors, settings)
    return ScreenResult(Path(out_dir), ranked, errors, patches, time.perf_counter() - started)


def _screen_slide(slide: SlidePatches, predictor: Predictor, folder: Path, um_per_px: float | None) -> SlideSummary:
    folder.mkdir(parents=True)
    probabilities, disagree = predictor.probabilities_with_disagreement(
        slide.pixels, SlidePositions.of([slide.patient] * len(slide.xs), slide.xs, slide.ys)
    )
    probability_grid = slide.grid(probabilities)
    truth_grid = slide.grid(np.where(slide.labels == NO_LABEL, np.nan, slide.labels)) if slide.has_labels else None
    summary = summarise_slide(
        slide.patient, probability_grid, predictor.threshold,
        uncertain_grid=slide.grid(disagree, empty=0).astype(bool), truth_grid=truth_grid, um_per_px=um_per_px,
    )
    mosaic = build_mosaic(slide)
    Image.fromarray(mosaic).save(folder / "mosaic.jpg", quality=90)
    save_png(shrink(mosaic, THUMBNAIL_PX), folder / "thumbnail.png")
    threshold = predictor.threshold
    heatmap_image(mosaic, probability_grid, threshold, folder / "heatmap.png",
                  title=f"{slide.patient}: IDC probability (cyan outline: at or above threshold {threshold:.2f})")
    if truth_grid is not None:
        heatmap_image(mosaic, truth_grid, 0.5, folder / "truth.png", title=f"{slide.patient}: ground truth (IDC = 1, outlined)",
                      values_label="true label")
    uncertain = uncertain_patches(probabilities, threshold, disagree)
    with open(folder / "patches.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "prob_idc", "pred", "uncertain", "label"])
        for row in zip(slide.xs, slide.ys, probabilities, probabilities >= threshold, uncertain, slide.labels):
            writer.writerow([row[0], row[1], f"{row[2]:.6f}", int(row[3]), int(row[4]), "" if row[5] == NO_LABEL else row[5]])
    idc_mask = np.nan_to_num(probability_grid, nan=-1) >= threshold
    (folder / "regions.geojson").write_text(json.dumps(regions_geojson(idc_mask, probability_grid, slide.patient)) + "\n")

    suspicious = np.argsort(-probabilities)[:EXPLAINED_PER_KIND]
    doubtful = [i for i in np.argsort(np.abs(probabilities - threshold)) if uncertain[i] and i not in suspicious][:EXPLAINED_PER_KIND]
    chosen = [(int(i), "most suspicious") for i in suspicious] + [(int(i), "uncertain") for i in doubtful]
    (folder / "explained").mkdir()
    cams = grad_cam(predictor.model, slide.pixels[[i for i, _ in chosen]], predictor.metadata.normalisation)
    gallery = []
    for (row, kind), cam in zip(chosen, cams):
        name = f"x{slide.xs[row]}_y{slide.ys[row]}.png"
        caption = f"{kind}: x={slide.xs[row]}, y={slide.ys[row]}, p(IDC) {probabilities[row]:.2f}"
        if slide.labels[row] != NO_LABEL:
            caption += f", true {'IDC' if slide.labels[row] == 1 else 'non-IDC'}"
        explanation_figure(slide.pixels[row], cam, folder / "explained" / name)
        gallery.append({"file": f"explained/{name}", "kind": kind, "caption": caption, "prob": float(probabilities[row])})
    (folder / "gallery.json").write_text(json.dumps(gallery, indent=1) + "\n")
    return summary
