"""Screening: slides rebuilt from patches, heatmaps, burden, triage, explanations, reports."""

from histoscreen.screening.analysis import SlideSummary, rank_slides, region_polygons, summarise_slide
from histoscreen.screening.pipeline import ScreenResult, screen
from histoscreen.screening.slides import SlidePatches, build_mosaic, find_slides

__all__ = [
    "ScreenResult",
    "SlidePatches",
    "SlideSummary",
    "build_mosaic",
    "find_slides",
    "rank_slides",
    "region_polygons",
    "screen",
    "summarise_slide",
]
