"""Reading a screening report back: the one owner of its layout besides the writer
(report/screening.py). The web app serves reports through this, never by parsing the files
itself, so a change of layout is made here and in the writer, and nowhere else.

Layout, version REPORT_VERSION: slides.json ({"format", "format_version", "settings",
"slides": rows of SLIDE_COLUMNS, "whole_slide_reading"}), errors.csv (where, problem) and per
slide slides/SLIDE/ with patches.csv (PATCH_COLUMNS), view.json, explained/*.png, the
pictures and the GeoJSON. Reports written before the version field are version 1.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from histoscreen.atomic import child_path
from histoscreen.errors import InputError
from histoscreen.problems import Problem
from histoscreen.report.screening import REPORT_FORMAT, REPORT_VERSION

PICTURES = ("overlay", "heatmap", "truth", "thumbnail")


class ReportReader:
    """A finished report folder, read as the writer wrote it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            payload = json.loads((self.folder / "slides.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"{self.folder}: not a readable screening report ({error})") from None
        if payload.get("format", REPORT_FORMAT) != REPORT_FORMAT or payload.get("format_version", 1) > REPORT_VERSION:
            raise InputError(f"{self.folder}: a report of format {payload.get('format')} version {payload.get('format_version')}; "
                             f"this version of histoscreen reads {REPORT_FORMAT} up to version {REPORT_VERSION}")
        self.settings: dict = payload["settings"]
        self.rows: list[dict] = payload["slides"]
        self.readings: dict = payload.get("whole_slide_reading", {})

    def has_slide(self, slide: str) -> bool:
        return any(row["patient"] == slide for row in self.rows)

    def slide_row(self, slide: str) -> dict:
        return next(row for row in self.rows if row["patient"] == slide)

    def errors(self) -> list[Problem]:
        with open(self.folder / "errors.csv", newline="", encoding="utf-8") as handle:
            return [Problem(row["where"], row["problem"]) for row in csv.DictReader(handle)]

    def slide_file(self, slide: str, *names: str) -> Path:
        """A file of a slide's folder, refused if it would leave it."""
        return child_path(self.folder, "slides", slide, *names)

    def patches(self, slide: str) -> list[dict]:
        """patches.csv, typed: grid x, y (int), level-0 corner (float), probability, call,
        uncertain, label (None where unknown)."""
        with open(self.slide_file(slide, "patches.csv"), newline="", encoding="utf-8") as handle:
            return [{"x": int(r["x"]), "y": int(r["y"]), "x_level0": float(r["x_level0"]), "y_level0": float(r["y_level0"]),
                     "prob_idc": float(r["prob_idc"]), "pred": int(r["pred"]), "uncertain": int(r["uncertain"]),
                     "label": int(r["label"]) if r["label"] else None}
                    for r in csv.DictReader(handle)]

    def view(self, slide: str) -> dict:
        """How the slide's grid lies on its mosaic (and on level 0 for a whole-slide image)."""
        return json.loads(self.slide_file(slide, "view.json").read_text(encoding="utf-8"))

    def explained(self, slide: str) -> list[str]:
        return sorted(p.name for p in self.slide_file(slide, "explained").glob("*.png"))

    def picture(self, slide: str, name: str) -> Path | None:
        path = self.slide_file(slide, f"{name}.png")
        return path if name in PICTURES and path.is_file() else None
