"""Writing a screening report: a self-contained folder that opens from disk.

  index.html, slides.csv, slides.json, errors.csv
  slides/<patient>.html and slides/<patient>/: mosaic.jpg, thumbnail.png, heatmap.png,
  truth.png (with ground truth), patches.csv, regions.geojson, explained/*.png

Slides are written as `Screening` yields them, so only one slide is in memory at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


from histoscreen.atomic import atomic_folder, child_path
from histoscreen.models.bundle import model_paths
from histoscreen.data.sources import NO_LABEL
from histoscreen.problems import Problem
from histoscreen.progress import Progress, silent
from histoscreen.report.html import write_index, write_slide_page
from histoscreen.report.pictures import (
    THUMBNAIL_PX,
    as_picture,
    explanation_figure,
    heatmap_image,
    load_drawing_modules,
    probability_overlay,
    save_png,
    shrink,
)
from histoscreen.tables import write_csv
from histoscreen.tasks.screen import Screening
from histoscreen.tasks.steps import SlideResult
from histoscreen.tasks.slides import SlideSummary, level0_corners, rank_slides, regions_geojson, tiles_geojson

# x, y: the cell's name on the model's grid (as Kaggle patch names); x_level0, y_level0: its
# top-left corner in the slide's level-0 pixels, as in the GeoJSON (what QuPath shows)
PATCH_COLUMNS = ["x", "y", "x_level0", "y_level0", "prob_idc", "pred", "uncertain", "label"]
REPORT_FORMAT, REPORT_VERSION = "histoscreen-screening-report", 1  # in slides.json; report/reader.py reads it
SLIDES_STAGE = "screening slides"  # progress in slides; each slide's own stage counts its patches
SLIDE_COLUMNS = [
    "rank", "patient", "patches", "idc_patches", "idc_fraction", "largest_region_patches", "largest_region_mm2",
    "confident_region_patches", "mean_prob", "max_prob", "uncertain",
    "true_idc_patches", "true_idc_fraction", "sensitivity", "specificity", "agreement",
]


@dataclass
class ScreeningReport:
    out: Path
    slides: list[SlideSummary]  # ranked, most suspicious first
    problems: list[Problem] = field(default_factory=list)
    patches: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.patches / self.seconds if self.seconds else 0.0
        lines = [
            f"report: {self.out / 'index.html'}",
            f"slides: {len(self.slides)} screened, {self.patches:,} patches in {self.seconds:.1f} s ({rate:,.0f} patches/s)",
            f"problems: {len(self.problems)}" + (f" (see {self.out / 'errors.csv'})" if self.problems else ""),
        ]
        for summary in self.slides[:5]:
            lines.append(
                f"  #{summary.rank} {summary.patient}: burden {summary.idc_fraction:.1%}, "
                f"largest region {summary.largest_region_patches} patches, {summary.uncertain} uncertain"
            )
        return lines


def write_screening_report(
    screening: Screening, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: Progress = silent
) -> ScreeningReport:
    """Screen every slide of `screening` and write the report folder `out_dir`."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    summaries: list[SlideSummary] = []
    readings: dict[str, dict] = {}
    pages: dict[str, dict] = {}  # each slide's page, written once the slides are ranked
    patches = 0
    inputs = [*screening.settings["inputs"], *model_paths(screening.settings["model"])]
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs, kind="screening report") as partial:

        def finish(result: SlideResult, writing: Future) -> None:
            nonlocal patches
            try:
                writing.result()
            except OSError:
                raise  # the disk (full, gone): a report that cannot be written whole is a failed run
            except Exception as error:  # a slide that cannot be drawn is reported, the rest go on
                shutil.rmtree(child_path(partial, "slides", result.patient), ignore_errors=True)
                (partial / "slides" / f"{result.patient}.html").unlink(missing_ok=True)
                screening.failures.append(Problem(result.patient, f"writing the report failed: {type(error).__name__}: {error}"))
            else:
                summaries.append(result.summary)
                patches += len(result.slide)
                if result.reading:
                    readings[result.patient] = result.reading

        # One slide's pages and pictures are written (PIL, one core) while the next slide is
        # read and scored: a batch of 40,000 x 30,000 px slides ran about 0.8 s a slide faster
        # on 2 cores. At most two slides' results are held (one written, one scored), so
        # memory levels off with the batch's length.
        pending = None
        progress(SLIDES_STAGE, 0, len(screening))
        load_drawing_modules()  # before the writer thread starts: it must import nothing (see there)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="report-writer") as writer:
            for number, result in enumerate(screening.results(progress), start=1):
                writing = writer.submit(write_slide, result, partial, screening.settings, pages)
                if pending is not None:
                    finish(*pending)
                pending = (result, writing)
                progress(SLIDES_STAGE, number, len(screening))
            if pending is not None:
                finish(*pending)
        ranked = rank_slides(summaries)
        for summary in ranked:
            write_slide_page(partial, summary, screening.settings, **pages[summary.patient])
        rows = [summary.as_row() for summary in ranked]
        write_csv(partial / "slides.csv", SLIDE_COLUMNS, ([row[c] for c in SLIDE_COLUMNS] for row in rows))
        payload = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "settings": screening.settings, "slides": rows,
                   "whole_slide_reading": readings}
        (partial / "slides.json").write_text(json.dumps(payload, indent=2) + "\n")
        problems = screening.problems
        write_csv(partial / "errors.csv", ["where", "problem"], ((p.where, p.reason) for p in problems))
        write_index(partial, ranked, problems, screening.settings)
    return ScreeningReport(out_dir, ranked, problems, patches, time.perf_counter() - started)


def _number(value: float) -> str:
    """A level-0 coordinate as written: whole numbers without a decimal point."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def write_slide(result: SlideResult, report_folder: Path, settings: dict, pages: dict[str, dict]) -> None:
    """Everything of one slide: pictures, patch table, regions, explanations; what its page
    needs goes into `pages` (the page waits for the slide's rank)."""
    folder = child_path(report_folder, "slides", result.patient)
    folder.mkdir(parents=True)
    slide, grid, threshold = result.slide, result.grid, result.threshold
    mosaic, reduction = result.mosaic, result.reduction
    picture = as_picture(mosaic)
    picture.save(folder / "mosaic.jpg", quality=90)
    save_png(shrink(picture, THUMBNAIL_PX), folder / "thumbnail.png")
    heatmap_image(picture, grid, result.probabilities, threshold, folder / "heatmap.png", reduction=reduction,
                  title=f"{result.patient}: IDC probability (cyan outline: at or above threshold {threshold:.2f})")
    if slide.has_labels:
        heatmap_image(picture, grid, slide.labels, 0.5, folder / "truth.png", reduction=reduction,
                      title=f"{result.patient}: ground truth (IDC = 1, outlined)", values_label="true label")
    scale = result.level0_per_grid_px
    lefts, tops = level0_corners(slide.xs, slide.ys, scale)
    write_csv(
        folder / "patches.csv", PATCH_COLUMNS,
        (
            [int(x), int(y), _number(left), _number(top), f"{p:.6f}", int(call), int(doubt), "" if label == NO_LABEL else int(label)]
            for x, y, left, top, p, call, doubt, label in zip(
                slide.xs, slide.ys, lefts, tops, result.probabilities, result.calls, result.uncertain, slide.labels)
        ),
    )
    bounds = result.level0_size
    geojson = regions_geojson(grid, result.calls, result.probabilities, result.patient, scale=scale, bounds=bounds)
    (folder / "regions.geojson").write_text(json.dumps(geojson) + "\n")
    tiles = tiles_geojson(slide, result.probabilities, result.calls, result.uncertain, scale=scale, bounds=bounds)
    (folder / "tiles.geojson").write_text(json.dumps(tiles) + "\n")
    # for the web viewer: the heatmap as one pixel per cell, and how cells map onto mosaic.jpg
    probability_overlay(grid, result.probabilities, folder / "overlay.png")
    view = {"mosaic": [mosaic.shape[1], mosaic.shape[0]], "cell_px": 50 / reduction, "grid": list(grid.extent),
            "origin": list(grid.pixel_origin), "threshold": threshold,
            # a whole-slide image: its level-0 size, and level-0 pixels per model pixel (the viewer shows level 0)
            "level0": {"size": list(result.level0_size), "per_grid_px": scale} if result.level0_size else None}
    (folder / "view.json").write_text(json.dumps(view) + "\n")

    (folder / "explained").mkdir()
    gallery = []
    for explanation in result.explanations:
        row = explanation.row
        name = f"x{slide.xs[row]}_y{slide.ys[row]}.png"
        caption = (f"{explanation.kind}: x={slide.xs[row]}, y={slide.ys[row]} (level 0: {_number(lefts[row])}, "
                   f"{_number(tops[row])} px), p(IDC) {result.probabilities[row]:.2f}")
        if slide.labels[row] != NO_LABEL:
            caption += f", true {'IDC' if slide.labels[row] == 1 else 'non-IDC'}"
        explanation_figure(explanation.pixels, explanation.evidence, folder / "explained" / name)
        gallery.append({"file": f"explained/{name}", "kind": explanation.kind, "caption": caption})
    pages[result.patient] = {"gallery": gallery, "has_truth": slide.has_labels, "reading": result.reading}
