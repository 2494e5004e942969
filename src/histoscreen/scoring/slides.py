"""Slide-level figures of a scoring: is each slide's tumour burden right, is any IDC slide
missed, do IDC slides come first?

A screening aid is judged per slide. A scoring can gain on patches on average and still
report a whole IDC slide as nearly free of it, so the cross-validation measures these
beside the patch figures. Burden is the product's: IDC calls / patches of the slide.

Only complete slides carry a true burden. Many recovered patients are scattered subsets
(every other patch, or every IDC patch with a sample of the rest): their share of IDC
patches is not the slide's. `complete_slides` tells them apart by how their patches touch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from histoscreen.data.grid import SlidePositions
from histoscreen.scoring.context import neighbourhoods

# A slide whose patches were all kept is mostly solid tissue: most patches have several of
# their 8 neighbours. Scattered subsets in the recovered data have (almost) none with 3, and
# subsets that kept every IDC patch with a sample of the rest fail the test on their non-IDC
# patches. Measured on the 143 patients in ../shared: complete slides score 0.81 to 1.00
# (non-IDC patches 0.74 to 0.99), scattered and class-sampled ones 0.00 to 0.65 (0.04 to 0.61).
TOUCHING_NEIGHBOURS = 3
COMPLETE_SHARE = 0.8
COMPLETE_SHARE_NON_IDC = 0.7
# An IDC slide is under-called when its reported burden is below half of the truth.
IDC_SLIDE_FRACTION = 0.20
UNDER_CALL_RATIO = 0.5


def complete_slides(positions: SlidePositions, labels: np.ndarray) -> dict[str, bool]:
    """Per slide: whether its patches look like the whole slide (see the top of this module)."""
    counts = neighbourhoods(np.zeros(len(positions)), positions, (1,))[1].counts
    touching = counts >= TOUCHING_NEIGHBOURS
    labels = np.asarray(labels)
    found = {}
    for slide in np.unique(positions.slides[positions.known].astype(str)):
        rows = positions.known & (positions.slides == slide)
        non_idc = rows & (labels == 0)
        found[str(slide)] = bool(touching[rows].mean() >= COMPLETE_SHARE and (not non_idc.any() or touching[non_idc].mean() >= COMPLETE_SHARE_NON_IDC))
    return found


@dataclass(frozen=True)
class SlideBurden:
    slide: str
    true_fraction: float
    burden: float  # IDC calls / patches

    @property
    def is_idc_slide(self) -> bool:
        return self.true_fraction >= IDC_SLIDE_FRACTION

    @property
    def under_called(self) -> bool:
        return self.is_idc_slide and self.burden < UNDER_CALL_RATIO * self.true_fraction


def slide_burdens(slides: np.ndarray, labels: np.ndarray, calls: np.ndarray, only: set[str] | None = None) -> list[SlideBurden]:
    """True IDC fraction and called burden of each slide (of those in `only`, when given)."""
    slides, labels, calls = np.asarray(slides).astype(str), np.asarray(labels), np.asarray(calls, dtype=bool)
    found = []
    for slide in np.unique(slides):
        if only is not None and slide not in only:
            continue
        rows = slides == slide
        found.append(SlideBurden(slide, float(labels[rows].mean()), float(calls[rows].mean())))
    return found


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their mean rank).

    >>> spearman([1, 2, 3, 4], [10, 20, 40, 30])
    0.8
    """
    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(1, len(values) + 1)
        _, tie, count = np.unique(values, return_inverse=True, return_counts=True)  # ties share their mean rank
        return (np.bincount(tie, weights=ranked) / count)[tie]

    a, b = ranks(first), ranks(second)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator else float("nan")


def slide_figures(burdens: list[SlideBurden]) -> dict:
    """Burden against truth over these slides: Spearman, mean absolute error, the IDC slides
    under-called, and where the IDC slides rank when slides are sorted by burden (1 = first):
    the worst rank, and the share of IDC slides among the first as many slides as there are
    IDC slides."""
    if not burdens:
        return {"slides": 0}
    truth = np.array([b.true_fraction for b in burdens])
    burden = np.array([b.burden for b in burdens])
    idc = np.array([b.is_idc_slide for b in burdens])
    order = np.argsort(-burden, kind="stable")
    rank = np.empty(len(burdens), dtype=int)
    rank[order] = np.arange(1, len(burdens) + 1)
    return {
        "slides": len(burdens),
        "idc_slides": int(idc.sum()),
        "spearman": spearman(truth, burden) if len(burdens) > 2 else float("nan"),
        "burden_mae": float(np.abs(truth - burden).mean()),
        "under_called": sorted(b.slide for b in burdens if b.under_called),
        "worst_idc_rank": int(rank[idc].max()) if idc.any() else 0,
        "idc_in_top": float((rank[idc] <= idc.sum()).mean()) if idc.any() else float("nan"),
    }


# A partial slide: a third of the patches (half the patients anyone holds here are partial).
PARTS = 3


def partial_slide_check(
    score: Callable[[np.ndarray], tuple[np.ndarray, float]], slides: np.ndarray, labels: np.ndarray, complete: set[str],
    *, seed: int = 0,
) -> dict:
    """Does a slide's context hold when only part of the slide is there?

    Each complete slide is cut at random into thirds; each third is scored alone (`score`
    takes row numbers and returns the probabilities and threshold of those patches scored
    as if no others were present) and compared with the same patches scored with the whole
    slide present. Returns the share of patches called alike, the change in accuracy over
    all those patches, and the mean and largest change of a third's burden.
    """
    rng = np.random.default_rng(seed)
    slides, labels = np.asarray(slides).astype(str), np.asarray(labels)
    chosen_slides = sorted(complete & set(slides.tolist()))
    rows_of = {slide: np.flatnonzero(slides == slide) for slide in chosen_slides}
    if not rows_of:
        return {"slides": 0}
    every = np.concatenate(list(rows_of.values()))
    probabilities, threshold = score(every)
    whole = dict(zip(every.tolist(), (probabilities >= threshold).tolist()))
    agree = right_whole = right_alone = patches = 0
    burden_changes = []
    for rows in rows_of.values():
        third = rng.permutation(len(rows)) % PARTS
        for index in range(PARTS):
            part = rows[third == index]
            probabilities, threshold = score(part)
            alone = probabilities >= threshold
            together = np.array([whole[row] for row in part.tolist()])
            truth = labels[part] == 1
            agree += int((alone == together).sum())
            right_whole += int((together == truth).sum())
            right_alone += int((alone == truth).sum())
            patches += len(part)
            burden_changes.append(abs(float(alone.mean()) - float(together.mean())))
    return {"slides": len(rows_of), "agreement": agree / patches, "accuracy_change": (right_alone - right_whole) / patches,
            "burden_change_mean": float(np.mean(burden_changes)), "burden_change_max": float(np.max(burden_changes))}
