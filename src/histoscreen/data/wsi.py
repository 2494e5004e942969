"""Whole-slide images as patch sources: a slide file is cut into 50-px tiles at the model's
resolution, on tissue only, and read in bands by worker processes, never held whole.

Reading goes through OpenSlide (the `[wsi]` extra: openslide-python and openslide-bin, which
ships the library), so Aperio .svs, generic and pyramidal TIFF, Hamamatsu .ndpi, MIRAX
.mrxs, Leica .scn, Ventana .bif and Philips TIFF all work.

- Resolution: the slide's µm/px (`mpp`) is the one given, else its metadata's
  (openslide.mpp-x and -y, aperio.MPP, the TIFF resolution tags), else an estimate from the
  objective power (10 µm / power: 40x is 0.25 µm/px), which the report says is one. Pixels
  must be square within 5%. Tiles are read from the pyramid level nearest the model's
  spacing that is not coarser, and resampled to it with area averaging.
- Grid: laid from the slide's origin at model resolution, 50 px a cell, so tile (column c,
  row r) is named like a Kaggle patch at x = 50c + 1, y = 50r + 1, and slide context,
  burden and regions work exactly as for patches. `level0_per_grid_px` maps back to the
  slide's own level-0 pixels (for QuPath).
- Tissue: saturation of a low-resolution image of the slide (about TISSUE_MPP µm/px),
  thresholded by Otsu's method, small holes closed and tiny specks opened away; a tile is
  kept when at least `min_tissue` of it is tissue.
"""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histoscreen.checks import number
from histoscreen.constants import BACKGROUND_RGB, COORD_ORIGIN, GRID_STEP, PATCH_SIZE
from histoscreen.data.naming import check_slide_id
from histoscreen.data.sources import NO_LABEL, PatchBatch, PatchSource, Shard
from histoscreen.errors import ArgumentError, InputError, SettingError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TISSUE_MPP = 8.0  # µm per pixel of the image tissue is found on
# What a slide may claim before anything is allocated for it. Pixel sizes beyond these are
# metadata errors (below the optical limit, or too coarse to show a cell); a whole-mount glass
# slide is 75 x 50 mm at most, so a larger claimed area is a wrong header, and would make the
# tissue image (8 µm/px) alone take gigabytes.
MPP_RANGE = (0.05, 50.0)
MAX_SLIDE_AREA_MM2 = 4000.0
COARSEST_VS_MODEL = 2.0
MAX_BAND_PX = 32_000_000  # level pixels read at once per band (RGBA: 128 MB)  # a slide may be at most this much coarser than the model's pixel size


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is told from glass; written into the report."""

    min_tissue: float = 0.25  # share of a tile that must be tissue to keep it
    hole_px: int = 5  # closing (holes filled) and opening (specks dropped), in px at TISSUE_MPP
    speck_px: int = 5
    min_saturation: int = 12  # Otsu's threshold never goes below this (0-255): blank glass stays out

    def __post_init__(self) -> None:
        number("min_tissue", self.min_tissue, low=0, high=1, low_open=True)
        for name in ("hole_px", "speck_px"):  # not command-line settings: an API caller's mistake
            size = getattr(self, name)
            if size < 1 or size % 2 == 0:
                raise ArgumentError(f"TissueSettings.{name} must be an odd number of pixels (a window centred on each pixel), got {size}")

    def as_dict(self) -> dict:
        return {**asdict(self), "mask_um_per_px": TISSUE_MPP, "method": "Otsu on HSV saturation, closing then opening"}


def is_slide_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(SLIDE_SUFFIXES)


def _openslide():
    try:
        import openslide
    except ImportError:
        raise InputError("reading whole-slide images needs the [wsi] extra: pip install 'histoscreen[wsi]'") from None
    return openslide


GIVE_MPP = "give its pixel size (mpp, µm per level-0 pixel)"
MAX_ANISOTROPY = 1.05  # mpp-x / mpp-y: beyond it a tile of square cells would distort the tissue


@dataclass(frozen=True)
class PixelSize:
    """A slide's µm per level-0 pixel and where it came from, as the report says it."""

    mpp: float
    source: str
    estimated: bool = False


def _number(properties: dict, key: str, path: Path, what: str = "pixel size") -> float:
    try:
        value = float(properties[key])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{path}: its metadata gives {key} = {properties[key]!r}, not a positive {what}; {GIVE_MPP}")
    return value


def _square(x: float, y: float, names: str, path: Path) -> float:
    """One pixel size for pixels that are square, or near enough (their geometric mean keeps areas)."""
    if max(x, y) / min(x, y) > MAX_ANISOTROPY:
        raise InputError(f"{path}: its pixels are not square ({names} give {x:g} x {y:g} µm); histoscreen reads square pixels only")
    return math.sqrt(x * y)


def slide_pixel_size(properties: dict, path: Path) -> PixelSize | None:
    """µm per level-0 pixel from a slide's metadata, or None when it gives none: measured
    (mpp-x and -y, aperio.MPP, TIFF resolution) first, else estimated from the objective."""
    if properties.get("openslide.mpp-x"):
        x = _number(properties, "openslide.mpp-x", path)
        y = _number(properties, "openslide.mpp-y", path) if properties.get("openslide.mpp-y") else x
        return PixelSize(_square(x, y, "openslide.mpp-x and mpp-y", path), "openslide.mpp-x/mpp-y in the slide's metadata")
    if properties.get("aperio.MPP"):  # OpenSlide leaves mpp-x out when aperio.MPP is no number
        return PixelSize(_number(properties, "aperio.MPP", path), "aperio.MPP in the slide's metadata")
    unit = properties.get("tiff.ResolutionUnit")
    if properties.get("tiff.XResolution") and unit in ("centimeter", "inch"):
        per_unit = 1e4 if unit == "centimeter" else 25400.0
        x = per_unit / _number(properties, "tiff.XResolution", path)
        y = per_unit / _number(properties, "tiff.YResolution", path) if properties.get("tiff.YResolution") else x
        return PixelSize(_square(x, y, "the TIFF X and Y resolutions", path), "the TIFF resolution tags")
    for key in ("openslide.objective-power", "aperio.AppMag"):
        if properties.get(key):
            power = _number(properties, key, path, what="objective power")
            return PixelSize(10.0 / power, f"ESTIMATED from the objective power ({key} = {power:g}x, taken as 10 µm / power); "
                             "the slide gives no measured pixel size, so areas may be off by 10-20%", estimated=True)
    return None


def check_pixel_size_setting(name: str, value: float | None) -> None:
    """A pixel size given as an option (mpp): a finite number a scanner gives."""
    low, high = MPP_RANGE
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise SettingError(name, f"must be a pixel size from {low:g} to {high:g} µm/px, got {value}")


def check_pixel_size(mpp: float, spacing_um_px: float, where: str) -> None:
    """Refuse a pixel size no scanner gives, or one too coarse for the model to see cells."""
    low, high = MPP_RANGE
    if not (math.isfinite(mpp) and low <= mpp <= high):
        raise InputError(f"{where}: a pixel size of {mpp:g} µm/px is outside {low:g}-{high:g} µm/px; check its metadata or {GIVE_MPP}")
    if mpp > spacing_um_px * COARSEST_VS_MODEL:
        raise InputError(f"{where}: {mpp:g} µm/px is coarser than the model can read (it needs {spacing_um_px:g} µm/px, "
                         f"at most {spacing_um_px * COARSEST_VS_MODEL:g})")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut that maximises the between-class variance."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 255.0
    levels = np.arange(256)
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * levels)
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-9)
    return float(np.argmax(between))


def square_filter(mask: np.ndarray, size: int, combine) -> np.ndarray:
    """Dilation (`combine` = logical_or) or erosion (logical_and) of a boolean mask by a
    size x size square, edges replicated: the same pixels as PIL's Max/MinFilter, but in
    shifted whole-array steps, one axis at a time (a rank filter took 0.4 s per pass on a
    40,000 x 30,000 px slide's mask; this takes about 10 ms)."""
    half = size // 2
    padded = np.pad(mask, half, mode="edge")
    height, width = mask.shape
    rows = padded[:height].copy()
    for step in range(1, size):
        combine(rows, padded[step : step + height], out=rows)
    out = rows[:, :width].copy()
    for step in range(1, size):
        combine(out, rows[:, step : step + width], out=out)
    return out


class WholeSlideSource(PatchSource):
    """One whole-slide image file: one slide, whose id is the file's stem."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        spacing_um_px: float,
        mpp: float | PixelSize | None = None,
        tissue: TissueSettings = TissueSettings(),
        workers: int | None = None,
        band_tiles: int = 512,
    ):
        super().__init__()
        openslide = _openslide()
        self.path = Path(path)
        self.description = str(self.path)
        reason = check_slide_id(self.path.stem)
        if reason:
            raise InputError(f"{self.path}: the file name {self.path.stem!r} {reason}")
        self.slide_id = self.path.stem
        try:
            slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as error:
            raise InputError(f"{self.path}: not a slide OpenSlide can read ({error})") from None
        with slide:
            if mpp is None:
                pixel_size = slide_pixel_size(dict(slide.properties), self.path)
            else:  # a Ray worker's shard passes on how the pixel size was found
                pixel_size = mpp if isinstance(mpp, PixelSize) else PixelSize(float(mpp), "given by the user")
            if pixel_size is None:
                raise InputError(f"{self.path}: this slide has no pixel size (no mpp-x, TIFF resolution or objective power "
                                 f"in its metadata); {GIVE_MPP}")
            self.mpp, self.pixel_size = float(pixel_size.mpp), pixel_size
            self.spacing = self.grid_um_per_px = float(spacing_um_px)
            check_pixel_size(self.mpp, self.spacing, str(self.path))
            width0, height0 = slide.dimensions
            area = width0 * self.mpp / 1e3 * height0 * self.mpp / 1e3
            if area > MAX_SLIDE_AREA_MM2:
                raise InputError(
                    f"{self.path}: {width0:,} x {height0:,} px at {self.mpp:g} µm/px would be {width0 * self.mpp / 1e3:,.0f} x "
                    f"{height0 * self.mpp / 1e3:,.0f} mm, more than a glass slide holds (at most {MAX_SLIDE_AREA_MM2:,.0f} mm²); "
                    "its header or pixel size is wrong"
                )
            self.level0_per_grid_px = self.spacing / self.mpp
            # the finest level that is not finer than needed: nearest the target, not coarser
            downsamples = slide.level_downsamples
            usable = [i for i, d in enumerate(downsamples) if d <= self.level0_per_grid_px * (1 + 1e-6)]
            self.level = max(usable, key=lambda i: downsamples[i]) if usable else 0
            self.level_downsample = float(downsamples[self.level])
            self.dimensions = self.level0_size = (width0, height0)
            self.columns = int(math.ceil(width0 / self.level0_per_grid_px / GRID_STEP))
            self.rows = int(math.ceil(height0 / self.level0_per_grid_px / GRID_STEP))
        self.tissue = tissue
        self.workers = workers
        self.band_tiles = band_tiles

    @functools.cached_property
    def _tiles(self) -> tuple[np.ndarray, np.ndarray, float]:
        # found when first needed: a Ray driver hands slides out unread, its workers tile them
        with _openslide().OpenSlide(str(self.path)) as slide:
            return self._tissue_tiles(slide)

    @property
    def tile_rows(self) -> np.ndarray:
        return self._tiles[0]

    @property
    def tile_columns(self) -> np.ndarray:
        return self._tiles[1]

    @property
    def tissue_threshold(self) -> float:
        return self._tiles[2]

    def _tissue_tiles(self, slide) -> tuple[np.ndarray, np.ndarray, float]:
        """Row and column of every tile with enough tissue, in reading order, and the
        saturation threshold that told tissue from glass."""
        cell = max(1, round(GRID_STEP * self.spacing / TISSUE_MPP))  # mask px per tile side
        size = (self.columns * cell, self.rows * cell)
        thumbnail = slide.get_thumbnail((self.dimensions[0] * self.mpp / TISSUE_MPP, self.dimensions[1] * self.mpp / TISSUE_MPP))
        canvas = Image.new("RGB", size, BACKGROUND_RGB)
        scale = (self.dimensions[0] / self.level0_per_grid_px / GRID_STEP * cell) / thumbnail.width
        canvas.paste(thumbnail.resize((round(thumbnail.width * scale), round(thumbnail.height * scale)), Image.Resampling.BOX))
        saturation = np.asarray(canvas.convert("HSV"))[..., 1]
        threshold = max(otsu_threshold(saturation), self.tissue.min_saturation)
        mask = saturation > threshold
        mask = square_filter(square_filter(mask, self.tissue.hole_px, np.logical_or), self.tissue.hole_px, np.logical_and)
        mask = square_filter(square_filter(mask, self.tissue.speck_px, np.logical_and), self.tissue.speck_px, np.logical_or)
        cells = mask.reshape(self.rows, cell, self.columns, cell).mean(axis=(1, 3))
        rows, columns = np.nonzero(cells >= self.tissue.min_tissue)
        return rows.astype(np.int64), columns.astype(np.int64), float(threshold)

    def slide_ids(self) -> list[str]:
        return [self.slide_id]

    def __len__(self) -> int:
        return len(self.tile_rows)

    def cells(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        return self.tile_columns * GRID_STEP + COORD_ORIGIN, self.tile_rows * GRID_STEP + COORD_ORIGIN

    def batches(self, batch_size: int = 256, slides: Iterable[str] | None = None) -> Iterator[PatchBatch]:
        if slides is not None and self.slide_id not in slides:
            return
        bands = self._bands()
        workers = min(self.workers or os.cpu_count() or 1, len(bands))
        with _openslide().OpenSlide(str(self.path)) as slide:
            read = functools.partial(_read_band, slide, self.level, self.level_downsample, self.level0_per_grid_px)
            # Threads, not processes: OpenSlide and Pillow decode and resample with the GIL
            # released, and a forked reader pool cost a 2-core batch 15-20% in copied pages.
            results = _in_order(read, bands, workers) if workers > 1 else (read(*band) for band in bands)
            try:
                for (rows, columns), pixels in zip(bands, results):
                    for start in range(0, len(rows), batch_size):
                        yield self._batch(rows[start : start + batch_size], columns[start : start + batch_size], pixels[start : start + batch_size])
            finally:
                results.close()  # a caller that stops early: the readers finish before the slide is closed

    def _bands(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tiles grouped into bands of whole grid rows, about `band_tiles` tiles each, each
        read as one region; a band whose region at the level read would pass MAX_BAND_PX
        (a slide without a pyramid, read at 0.25 µm/px) is cut into narrower ones."""
        level_px_per_tile = (GRID_STEP * self.level0_per_grid_px / self.level_downsample) ** 2
        most_cells = max(1, int(MAX_BAND_PX // level_px_per_tile))  # grid cells a band's box may span
        bands, start = [], 0
        while start < len(self.tile_rows):
            end = min(start + self.band_tiles, len(self.tile_rows))
            while end < len(self.tile_rows) and self.tile_rows[end] == self.tile_rows[end - 1]:
                end += 1  # finish the grid row: a band is read as one region
            bands += self._narrowed(self.tile_rows[start:end], self.tile_columns[start:end], most_cells)
            start = end
        return bands

    @staticmethod
    def _narrowed(rows: np.ndarray, columns: np.ndarray, most_cells: int) -> list[tuple[np.ndarray, np.ndarray]]:
        span = (int(rows.max()) - int(rows.min()) + 1) * (int(columns.max()) - int(columns.min()) + 1)
        if span <= most_cells:
            return [(rows, columns)]
        if rows.min() != rows.max():  # one grid row at a time first
            return [band for row in np.unique(rows) for band in WholeSlideSource._narrowed(rows[rows == row], columns[rows == row], most_cells)]
        width = most_cells  # then stretches of one row, at most most_cells cells wide
        keys = (columns - columns.min()) // width
        return [(rows[keys == key], columns[keys == key]) for key in np.unique(keys)]

    def _batch(self, rows: np.ndarray, columns: np.ndarray, pixels: np.ndarray) -> PatchBatch:
        xs, ys = columns * GRID_STEP + COORD_ORIGIN, rows * GRID_STEP + COORD_ORIGIN
        count = len(rows)
        return PatchBatch(
            pixels,
            np.array([f"{self.path}#x{x}_y{y}" for x, y in zip(xs, ys)], dtype=object),
            np.full(count, self.slide_id, dtype=object),
            xs.astype(np.int64), ys.astype(np.int64),
            np.full(count, PATCH_SIZE, dtype=np.int64), np.full(count, PATCH_SIZE, dtype=np.int64),
            np.full(count, NO_LABEL, dtype=np.int64),
        )

    def shard(self, slides: Sequence[str]) -> Shard:
        tiles = len(self) if "_tiles" in self.__dict__ else 0  # not worth finding the tissue here just to count
        return WholeSlideShard(str(self.path), self.spacing, self.pixel_size, self.tissue, self.band_tiles, tiles)

    def read_cells(self, slide_id: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        columns, rows = (np.asarray(xs) - COORD_ORIGIN) // GRID_STEP, (np.asarray(ys) - COORD_ORIGIN) // GRID_STEP
        with _openslide().OpenSlide(str(self.path)) as slide:
            tiles = [_read_band(slide, self.level, self.level_downsample, self.level0_per_grid_px, np.array([r]), np.array([c]))
                     for r, c in zip(rows, columns)]
        return np.concatenate(tiles) if tiles else np.empty((0, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)

    def settings(self) -> dict:
        return {
            "slide_um_per_px": self.mpp,
            "slide_um_per_px_from": self.pixel_size.source,
            "slide_um_per_px_estimated": self.pixel_size.estimated,
            "model_um_per_px": self.spacing,
            "level": self.level,
            "level_downsample": self.level_downsample,
            "level0_px_per_model_px": self.level0_per_grid_px,
            "grid": [self.rows, self.columns],
            "tissue_tiles": len(self),
            "tissue": {**self.tissue.as_dict(), "saturation_threshold": self.tissue_threshold},
        }


@dataclass(frozen=True)
class WholeSlideShard(Shard):
    """One slide file, tiled again where it is opened (its tissue found the same way)."""

    path: str
    spacing_um_px: float
    mpp: PixelSize
    tissue: TissueSettings
    band_tiles: int
    tiles: int = 0

    @property
    def patches(self) -> int:
        return self.tiles

    def open(self, workers: int | None = None) -> PatchSource:
        return WholeSlideSource(self.path, spacing_um_px=self.spacing_um_px, mpp=self.mpp,
                                tissue=self.tissue, workers=workers, band_tiles=self.band_tiles)


def _in_order(read, bands: list, workers: int) -> Iterator[np.ndarray]:
    """read(*band) for every band on `workers` threads, yielded in order, at most `workers` + 1
    bands read ahead: memory follows the band, not the slide."""
    with ThreadPoolExecutor(workers, thread_name_prefix="slide-reader") as pool:
        pending = deque()
        try:
            for band in bands:
                pending.append(pool.submit(read, *band))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early: no read may still run when the caller closes the slide
            for future in pending:
                future.cancel()


def _read_band(slide, level: int, downsample: float, level0_per_grid_px: float, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The tiles of one band of grid rows at model resolution: read the band's region from
    the chosen level once, resample it with area averaging, cut it into tiles."""
    first_row, last_row = int(rows.min()), int(rows.max())
    first_column, last_column = int(columns.min()), int(columns.max())
    width = (last_column - first_column + 1) * GRID_STEP
    height = (last_row - first_row + 1) * GRID_STEP
    level_per_grid_px = level0_per_grid_px / downsample
    # the band's box in level pixels (floats), and the whole pixels that cover it
    left, top = first_column * GRID_STEP * level_per_grid_px, first_row * GRID_STEP * level_per_grid_px
    box_width, box_height = width * level_per_grid_px, height * level_per_grid_px
    x0, y0 = math.floor(left), math.floor(top)
    read_width, read_height = math.ceil(left + box_width) - x0, math.ceil(top + box_height) - y0
    region = slide.read_region((round(x0 * downsample), round(y0 * downsample)), level, (read_width, read_height))
    alpha = region.getchannel("A")
    if alpha.getextrema() == (255, 255):  # all slide, no glass to add: most bands
        band = region.convert("RGB")
    else:
        band = Image.new("RGB", region.size, BACKGROUND_RGB)
        band.paste(region, mask=alpha)  # no data beyond the slide: glass
    if band.size != (width, height) or (left, top) != (x0, y0):  # a level at exactly the grid's spacing needs no resampling
        band = band.resize((width, height), Image.Resampling.BOX, box=(left - x0, top - y0, left - x0 + box_width, top - y0 + box_height))
    pixels = np.asarray(band)
    tiles = np.empty((len(rows), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    for index, (row, column) in enumerate(zip(rows - first_row, columns - first_column)):
        tiles[index] = pixels[row * GRID_STEP : (row + 1) * GRID_STEP, column * GRID_STEP : (column + 1) * GRID_STEP]
    return tiles
