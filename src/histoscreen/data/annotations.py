"""A pathologist's annotations as labels: a GeoJSON exported from QuPath (File > Export
objects as GeoJSON), or the regions.geojson histoscreen wrote after a pathologist edited them.

Polygons and multipolygons (holes kept) in the slide's level-0 pixels, each classified
"IDC" or another class (non-IDC: "non-IDC", "Stroma", "Normal", ...); unclassified objects
and detections of other tools' classes count as what they are named, unclassified ones as
nothing. A grid cell (one 50-px patch at the model's spacing) takes a label when at least
half of it lies inside that class's polygons; IDC wins where both reach half.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histoscreen.constants import COORD_ORIGIN, GRID_STEP
from histoscreen.data.sources import NO_LABEL
from histoscreen.errors import InputError
from histoscreen.jsontext import read_json_text

IDC_CLASSES = {"idc", "tumor", "tumour", "invasive ductal carcinoma"}
MAX_ANNOTATION_BYTES = 256 << 20
# Bounds on what a reviewer's annotations can be: a slide's level 0 is at most a few hundred
# thousand pixels a side, and a hand-drawn or QuPath-traced outline a few thousand points.
MAX_LEVEL0_COORDINATE = 10_000_000
MAX_ANNOTATION_VERTICES = 250_000
RASTER_PER_CELL = 8  # each cell is drawn as 8 x 8 samples: its covered share to 1/64
COVERED = 0.5


@dataclass(frozen=True)
class Annotation:
    label: int  # 1 IDC, 0 another class
    polygons: list[list[np.ndarray]]  # each: the outer ring, then its holes; rings are N x 2 (x, y)


def read_annotations(path: str | os.PathLike) -> list[Annotation]:
    """The classified polygons of a GeoJSON file; one clear line for anything else."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_ANNOTATION_BYTES:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes; annotations larger than {MAX_ANNOTATION_BYTES >> 20} MiB are refused")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such annotations file") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    payload = read_json_text(text, path, error=InputError, what="the annotations file")
    features = payload.get("features") if isinstance(payload, dict) and payload.get("type") == "FeatureCollection" else payload
    if isinstance(features, dict) and features.get("type") == "Feature":
        features = [features]
    if not isinstance(features, list):
        raise InputError(f"{path}: not GeoJSON features (a FeatureCollection, or a list of Features as QuPath exports)")
    found, vertices = [], 0
    for number, feature in enumerate(features, start=1):
        where = f"{path}, feature {number}"
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise InputError(f"{where}: not a Feature with a geometry")
        label = _label_of(feature.get("properties") or {})
        if label is None:
            continue  # unclassified: no label either way
        geometry = feature["geometry"]
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            polygons = [_rings(coordinates, where)]
        elif kind == "MultiPolygon" and isinstance(coordinates, list):
            polygons = [_rings(part, where) for part in coordinates]
        else:
            continue  # points and lines cover no area
        vertices += sum(len(ring) for polygon in polygons for ring in polygon)
        if vertices > MAX_ANNOTATION_VERTICES:
            raise InputError(f"{where}: more than {MAX_ANNOTATION_VERTICES:,} polygon points in the file; simplify the outlines "
                             "(QuPath: Objects > Annotations > Simplify shape)")
        found.append(Annotation(label, polygons))
    return found


def _label_of(properties: dict) -> int | None:
    classification = properties.get("classification")
    name = classification.get("name") if isinstance(classification, dict) else classification
    if not isinstance(name, str) or not name.strip():
        return None
    return 1 if name.strip().lower() in IDC_CLASSES else 0


def _rings(coordinates, where: str) -> list[np.ndarray]:
    if not isinstance(coordinates, list) or not coordinates:
        raise InputError(f"{where}: a polygon needs a list of rings of [x, y] points")
    rings = []
    for ring in coordinates:
        try:
            points = np.asarray(ring, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{where}: a ring must be a list of [x, y] numbers") from None
        if points.ndim != 2 or points.shape[1] < 2 or len(points) < 3 or not np.isfinite(points[:, :2]).all():
            raise InputError(f"{where}: a ring must hold at least 3 finite [x, y] points")
        if np.abs(points[:, :2]).max() > MAX_LEVEL0_COORDINATE:
            raise InputError(f"{where}: a point lies {np.abs(points[:, :2]).max():,.0f} px from the origin, beyond any slide "
                             f"(at most {MAX_LEVEL0_COORDINATE:,}); coordinates must be the slide's level-0 pixels")
        rings.append(points[:, :2])
    return rings


def label_cells(
    annotations: list[Annotation], xs: np.ndarray, ys: np.ndarray, *, level0_per_grid_px: float,
    level0_size: tuple[int, int], where: str,
) -> np.ndarray:
    """A label per cell named x, y (1-based, on the model's grid): 1 or 0 where at least half
    of the cell lies in polygons of that class (IDC first), NO_LABEL elsewhere. A polygon
    wholly outside the slide is an error naming it: its coordinates are in another frame."""
    width, height = level0_size
    cell = GRID_STEP * level0_per_grid_px  # level-0 pixels a cell
    for number, annotation in enumerate(annotations, start=1):
        points = np.concatenate([ring for polygon in annotation.polygons for ring in polygon])
        if points[:, 0].max() < 0 or points[:, 1].max() < 0 or points[:, 0].min() > width or points[:, 1].min() > height:
            raise InputError(f"{where}: annotation {number} lies outside the slide ({width:,} x {height:,} px at level 0); "
                             "its coordinates must be the slide's level-0 pixels")
    columns = (np.asarray(xs) - COORD_ORIGIN) // GRID_STEP
    rows = (np.asarray(ys) - COORD_ORIGIN) // GRID_STEP
    labels = np.full(len(columns), NO_LABEL, dtype=np.int64)
    if not len(columns):
        return labels
    scale = RASTER_PER_CELL / cell  # raster pixels per level-0 pixel
    size = (int(math.ceil((columns.max() + 1) * RASTER_PER_CELL)), int(math.ceil((rows.max() + 1) * RASTER_PER_CELL)))
    shares = {}
    for label in (0, 1):
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for annotation in annotations:
            if annotation.label != label:
                continue
            for outer, *holes in annotation.polygons:
                draw.polygon([tuple(p) for p in outer * scale], fill=1)
                for hole in holes:
                    draw.polygon([tuple(p) for p in hole * scale], fill=0)
        covered = np.asarray(mask, dtype=np.float64).reshape(size[1] // RASTER_PER_CELL, RASTER_PER_CELL, size[0] // RASTER_PER_CELL, RASTER_PER_CELL)
        shares[label] = covered.mean(axis=(1, 3))[rows, columns]
    labels[shares[0] >= COVERED] = 0
    labels[shares[1] >= COVERED] = 1
    return labels
