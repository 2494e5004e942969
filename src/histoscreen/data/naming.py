"""Parse and build Kaggle patch file names: <patient>_idx5_x<X>_y<Y>_class<C>.png."""

from __future__ import annotations

from dataclasses import dataclass

from histoscreen.constants import (
    SAFE_SLIDE_ID,
    COORD_ORIGIN,
    GRID_STEP,
    PATCH_NAME_PATTERN,
    PATCH_NAME_TEMPLATE,
)


@dataclass(frozen=True)
class PatchName:
    patient: str
    x: int
    y: int
    label: int

    @property
    def key(self) -> tuple[str, int, int]:
        """What makes a patch unique: the archive's doubled copies share it."""
        return (self.patient, self.x, self.y)

    @property
    def column(self) -> int:
        return grid_index(self.x)

    @property
    def row(self) -> int:
        return grid_index(self.y)


def grid_index(coordinate):
    """The grid column (of an x) or row (of a y): the one place the 1-based, 50-px grid is
    turned into cells. Works on ints and on numpy arrays alike."""
    return (coordinate - COORD_ORIGIN) // GRID_STEP


def on_grid(coordinate: int) -> bool:
    return coordinate >= COORD_ORIGIN and (coordinate - COORD_ORIGIN) % GRID_STEP == 0


def parse_patch_name(file_name: str) -> PatchName | None:
    """Return the parts of a Kaggle patch name, or None when it does not follow the pattern.

    >>> parse_patch_name("10253_idx5_x601_y851_class0.png")
    PatchName(patient='10253', x=601, y=851, label=0)
    """
    match = PATCH_NAME_PATTERN.match(file_name)
    if match is None:
        return None
    return PatchName(
        patient=match["patient"],
        x=int(match["x"]),
        y=int(match["y"]),
        label=int(match["label"]),
    )


def patch_file_name(patient: str, x: int, y: int, label: int) -> str:
    return PATCH_NAME_TEMPLATE.format(patient=patient, x=x, y=y, label=label)


def check_slide_id(slide_id: str) -> str | None:
    """Why `slide_id` cannot name a slide (it becomes a folder and file name in reports), or
    None. Kaggle ids are digits; other sources need a plain slug.

    >>> check_slide_id("10253") is None, check_slide_id("../../x")
    (True, 'is not a safe slide id: use letters, digits, ".", "_" and "-" (up to 128), starting with a letter or digit')
    """
    if isinstance(slide_id, str) and SAFE_SLIDE_ID.fullmatch(slide_id):
        return None
    return 'is not a safe slide id: use letters, digits, ".", "_" and "-" (up to 128), starting with a letter or digit'


def patient_sort_key(patient: str) -> tuple[int, str]:
    """Numeric order for digit ids ('9023' before '10253') without assuming they are digits."""
    return (len(patient), patient)
