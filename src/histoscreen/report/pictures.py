"""Pictures of a slide: mosaic, thumbnail, IDC heatmap overlay with legend, ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histoscreen.constants import GRID_STEP
from histoscreen.tasks.slides import SlideGrid

THUMBNAIL_PX = 320
VIEW_PX = 1000  # longest side of the pictures on a slide's page
OUTLINE_RGB = (0, 229, 255)


def load_drawing_modules() -> None:
    """Import now, in the calling thread, what drawing a slide imports on first use:
    matplotlib's colour maps, Pillow's file formats and its default font.

    The report writer draws in a thread while the next slide's patches are decoded by
    forked processes. A fork taken while another thread is importing a module copies that
    module's lock, held by a thread the child does not have, and a decoder that needs the
    module waits for ever: the demo hung so once. (The decoders import nothing either,
    data.patch_files.decode_files: this keeps the writer from holding a lock at a fork at all.)"""
    from matplotlib import colormaps

    colormaps["inferno"]
    Image.init()
    ImageFont.load_default(size=14)


def save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, optimize=False, compress_level=6)


def as_picture(mosaic: np.ndarray | Image.Image) -> Image.Image:
    """A slide's picture as a Pillow image. Making one copies the pixels (0.1 s for a whole
    slide's, more when the array is a cropped view): make it once per slide and pass it on."""
    return mosaic if isinstance(mosaic, Image.Image) else Image.fromarray(mosaic)


def shrink(mosaic: np.ndarray | Image.Image, longest: int) -> np.ndarray:
    picture = as_picture(mosaic)
    width, height = picture.size
    scale = min(1.0, longest / max(height, width))
    if scale == 1.0:
        return np.asarray(picture)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(picture.resize(size, Image.Resampling.BOX))


def heatmap_image(
    mosaic: np.ndarray | Image.Image,
    grid: SlideGrid,
    patch_values: np.ndarray,
    threshold: float,
    path: Path,
    *,
    title: str,
    reduction: int = 1,
    values_label: str = "IDC probability",
) -> None:
    """The mosaic (drawn at 1/`reduction` of full resolution) with a semi-transparent
    perceptual colour map (inferno) of each patch's value over its cell, the outline of the
    cells at or above `threshold` in cyan, and a colour bar. Drawn with numpy and Pillow: a
    tenth of the time matplotlib takes."""
    from matplotlib import colormaps

    picture = as_picture(mosaic)
    view = shrink(picture, VIEW_PX).astype(np.float32)
    height, width = view.shape[:2]
    slide_px_per_view_px = reduction * picture.size[0] / width
    rows = (np.arange(height) * slide_px_per_view_px // GRID_STEP).astype(np.int64)
    columns = (np.arange(width) * slide_px_per_view_px // GRID_STEP).astype(np.int64)
    items = grid.cells.find(np.repeat(rows, width), np.tile(columns, height)).reshape(height, width)
    values = np.where(items >= 0, np.asarray(patch_values, dtype=np.float64)[np.maximum(items, 0)], np.nan)
    known = ~np.isnan(values)
    level = np.nan_to_num(values)
    # Opacity grows with the value, so tissue the model finds unremarkable stays visible.
    opacity = np.where(known, 0.2 + 0.5 * level, 0.0)[..., None]
    colours = colormaps["inferno"](level)[..., :3] * 255
    blended = view * (1 - opacity) + colours * opacity
    above = known & (level >= threshold)
    border = np.zeros_like(above)
    border[:, 1:] |= above[:, 1:] != above[:, :-1]
    border[1:, :] |= above[1:, :] != above[:-1, :]
    border[:, 0] |= above[:, 0]
    border[:, -1] |= above[:, -1]
    border[0, :] |= above[0, :]
    border[-1, :] |= above[-1, :]
    blended[border] = OUTLINE_RGB

    font = ImageFont.load_default(size=14)
    title_height, legend_width = 28, 110
    canvas = Image.new("RGB", (width + legend_width, height + title_height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended.astype(np.uint8)), (0, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), title, fill=(0, 0, 0), font=font)
    bar_top, bar_height, bar_left = title_height + 10, max(60, min(300, height - 20)), width + 14
    gradient = colormaps["inferno"](np.linspace(1, 0, bar_height))[:, :3] * 255
    canvas.paste(Image.fromarray(np.repeat(gradient[:, None, :], 18, axis=1).astype(np.uint8)), (bar_left, bar_top))
    for value in (0.0, 0.5, 1.0):
        y = bar_top + round((1 - value) * (bar_height - 1))
        draw.line([(bar_left + 18, y), (bar_left + 22, y)], fill=(0, 0, 0))
        draw.text((bar_left + 25, y - 7), f"{value:.1f}", fill=(0, 0, 0), font=font)
    y = bar_top + round((1 - threshold) * (bar_height - 1))
    draw.line([(bar_left - 3, y), (bar_left + 21, y)], fill=OUTLINE_RGB, width=3)
    draw.text((bar_left, bar_top + bar_height + 6), values_label.replace(" ", "\n", 1), fill=(0, 0, 0), font=font)
    canvas.save(path, compress_level=3)  # half the time of the default 6 for a 6% larger file


def evidence_overlay(patch: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A patch with its evidence map over it (inferno, half opacity)."""
    from matplotlib import colormaps

    heat = colormaps["inferno"](cam)[..., :3] * 255
    return (0.5 * patch + 0.5 * heat).astype(np.uint8)


def probability_overlay(grid: SlideGrid, probabilities: np.ndarray, path: Path) -> None:
    """One RGBA pixel per grid cell: the probability in inferno, more opaque where higher,
    transparent where no patch was screened (for the web viewer's heatmap layer)."""
    from matplotlib import colormaps

    rows, columns = np.mgrid[0 : grid.extent[0], 0 : grid.extent[1]]
    items = grid.cells.find(rows.ravel(), columns.ravel()).reshape(grid.extent)
    values = np.where(items >= 0, np.asarray(probabilities, dtype=np.float64)[np.maximum(items, 0)], 0.0)
    rgba = (colormaps["inferno"](values) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(items >= 0, (0.35 + 0.6 * values) * 255, 0).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)


def explanation_figure(patch: np.ndarray, cam: np.ndarray, path: Path, scale: int = 4) -> None:
    """The patch beside its evidence overlay, both enlarged `scale` times without smoothing
    so the nuclei stay crisp; the page carries the caption."""
    overlay = evidence_overlay(patch, cam)
    gap = np.full((patch.shape[0], 3, 3), 255, dtype=np.uint8)
    pair = np.concatenate([patch, gap, overlay], axis=1)
    Image.fromarray(pair).resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.Resampling.NEAREST).save(path)
