"""Pictures of a slide: mosaic, thumbnail, IDC heatmap overlay with legend, ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histoscreen.constants import GRID_STEP

THUMBNAIL_PX = 320
VIEW_PX = 1200  # longest side of the pictures on a slide's page


def save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, optimize=False, compress_level=6)


def shrink(mosaic: np.ndarray, longest: int) -> np.ndarray:
    height, width = mosaic.shape[:2]
    scale = min(1.0, longest / max(height, width))
    if scale == 1.0:
        return mosaic
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(mosaic).resize(size, Image.Resampling.BOX))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _region_outline(axes, mask: np.ndarray, colour: str) -> None:
    """Draw the borders between cells inside and outside `mask` (slide pixel coordinates)."""
    padded = np.pad(mask, 1)
    segments = []
    rows, columns = np.nonzero(padded[1:-1, 1:-1] != padded[:-2, 1:-1])  # horizontal borders above cells
    segments += [[(c * GRID_STEP, r * GRID_STEP), ((c + 1) * GRID_STEP, r * GRID_STEP)] for r, c in zip(rows, columns)]
    rows, columns = np.nonzero(padded[1:-1, 1:-1] != padded[1:-1, :-2])  # vertical borders left of cells
    segments += [[(c * GRID_STEP, r * GRID_STEP), (c * GRID_STEP, (r + 1) * GRID_STEP)] for r, c in zip(rows, columns)]
    last_row = np.nonzero(mask[-1])[0]
    segments += [[(c * GRID_STEP, mask.shape[0] * GRID_STEP), ((c + 1) * GRID_STEP, mask.shape[0] * GRID_STEP)] for c in last_row]
    last_column = np.nonzero(mask[:, -1])[0]
    segments += [[(mask.shape[1] * GRID_STEP, r * GRID_STEP), (mask.shape[1] * GRID_STEP, (r + 1) * GRID_STEP)] for r in last_column]
    if segments:
        from matplotlib.collections import LineCollection

        axes.add_collection(LineCollection(segments, colors=colour, linewidths=1.2))


def heatmap_figure(
    mosaic: np.ndarray,
    probability_grid: np.ndarray,
    threshold: float,
    path: Path,
    *,
    title: str,
    values_label: str = "IDC probability",
    outline: np.ndarray | None = None,
) -> None:
    """The mosaic with a semi-transparent perceptual colour map of `probability_grid` on the
    screened patches, a colour bar, and the outline of the cells above `threshold`."""
    plt = _plt()
    height, width = mosaic.shape[:2]
    view = shrink(mosaic, VIEW_PX)
    figure_width = 9.0
    figure, axes = plt.subplots(figsize=(figure_width, max(3.0, figure_width * height / width * 0.85)))
    extent = (0, width, height, 0)
    axes.imshow(view, extent=extent, interpolation="nearest")
    grid_extent = (0, probability_grid.shape[1] * GRID_STEP, probability_grid.shape[0] * GRID_STEP, 0)
    # Opacity grows with the value, so tissue the model finds unremarkable stays visible.
    opacity = np.where(np.isnan(probability_grid), 0.0, 0.2 + 0.5 * np.nan_to_num(probability_grid))
    overlay = axes.imshow(
        np.ma.masked_invalid(probability_grid), cmap="inferno", vmin=0, vmax=1, alpha=opacity,
        extent=grid_extent, interpolation="nearest",
    )
    mask = np.nan_to_num(probability_grid, nan=-1) >= threshold if outline is None else outline
    _region_outline(axes, mask, "#00e5ff")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("slide x (px)")
    axes.set_ylabel("slide y (px)")
    bar = figure.colorbar(overlay, ax=axes, fraction=0.035, pad=0.02)
    bar.set_label(values_label)
    bar.ax.axhline(threshold, color="#00e5ff", linewidth=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def explanation_figure(patch: np.ndarray, cam: np.ndarray, path: Path, scale: int = 4) -> None:
    """The patch beside its Grad-CAM overlay (inferno, half opacity), both enlarged `scale`
    times without smoothing so the nuclei stay crisp; the page carries the caption."""
    from matplotlib import colormaps

    heat = colormaps["inferno"](cam)[..., :3] * 255
    overlay = (0.5 * patch + 0.5 * heat).astype(np.uint8)
    gap = np.full((patch.shape[0], 3, 3), 255, dtype=np.uint8)
    pair = np.concatenate([patch, gap, overlay], axis=1)
    Image.fromarray(pair).resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.Resampling.NEAREST).save(path)
