"""What the slide viewer needs: Deep Zoom tiles of a screened slide (the whole-slide image
itself down to level 0, or the report's mosaic for a slide made of patches), and single
patches (with their evidence maps) read again from the job's input on request."""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

DZI_TILE = 256


class DeepZoom:
    """A Deep Zoom pyramid of one image (the report's mosaic.jpg), built lazily level by level."""

    def __init__(self, path: Path):
        self.image = Image.open(path).convert("RGB")
        self.width, self.height = self.image.size
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        self._levels: dict[int, Image.Image] = {self.max_level: self.image}
        self._lock = threading.RLock()  # a level is made from the next finer one, under the same lock

    def descriptor(self) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{DZI_TILE}" Overlap="0" Format="jpeg">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )

    def level(self, level: int) -> Image.Image:
        with self._lock:
            if level not in self._levels:
                larger = self.level(level + 1) if level + 1 <= self.max_level else self.image
                self._levels[level] = larger.resize((max(1, math.ceil(larger.width / 2)), max(1, math.ceil(larger.height / 2))),
                                                    Image.Resampling.BOX)
            return self._levels[level]

    def tile(self, level: int, column: int, row: int) -> bytes | None:
        if not 0 <= level <= self.max_level:
            return None
        image = self.level(level)
        left, top = column * DZI_TILE, row * DZI_TILE
        if column < 0 or row < 0 or left >= image.width or top >= image.height:
            return None
        buffer = io.BytesIO()
        image.crop((left, top, min(left + DZI_TILE, image.width), min(top + DZI_TILE, image.height))).save(buffer, "JPEG", quality=88)
        return buffer.getvalue()


class SlideDeepZoom:
    """Deep Zoom tiles of a whole-slide image file, its level 0 at the deepest zoom
    (openslide-python's DeepZoomGenerator), so a pathologist can look at cells."""

    def __init__(self, path: Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.slide = openslide.OpenSlide(str(path))
        # 254 + 2 px of overlap: tiles of 256, as OpenSeadragon draws best
        self.generator = DeepZoomGenerator(self.slide, tile_size=DZI_TILE - 2, overlap=1, limit_bounds=False)
        self.width, self.height = self.slide.dimensions

    def descriptor(self) -> str:
        return self.generator.get_dzi("jpeg")

    def tile(self, level: int, column: int, row: int) -> bytes | None:
        try:
            image = self.generator.get_tile(level, (column, row))
        except ValueError:  # a level or an address outside the slide
            return None
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=88)
        return buffer.getvalue()


class LeastRecentlyUsed(OrderedDict):
    """A small cache: pyramids and patch sources are costly to build and few are in use."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def get_or_make(self, key, make):
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


def png_bytes(pixels: np.ndarray, scale: int = 4) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()
