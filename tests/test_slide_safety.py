"""Slide-safe scoring: what the shipped slide context must never do, whatever the slide.

A screening aid must not hide an IDC slide because of how the rest of the slide scores.
(a) monotone: raising one patch's score never lowers another patch's probability on its
slide (a Hypothesis property over random slides); (b) density and (c) no under-called IDC
slide: the shipped procedure, fitted as the cross-validation fits it, on its held-out
complete slides (tests/data/cv_logits.npz), and the shipped model itself on real slides.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histoscreen.data import SlidePositions
from histoscreen.models import load_metadata, shipped_model_path
from histoscreen.runtime import Predictor
from histoscreen.scoring.calibration import ThresholdRule, fit_scoring, scored
from histoscreen.scoring.slides import complete_slides, partial_slide_check, slide_burdens, slide_figures


@st.composite
def slides_with_a_raised_patch(draw):
    """1-3 slides of 1-60 patches on a grid up to 14 x 14 (duplicates of a cell allowed, as in
    an archive), logits on the scale networks give, and one patch whose logit rises."""
    count = draw(st.integers(1, 60))
    slides = draw(st.lists(st.sampled_from(["10253", "8863", "16570"]), min_size=count, max_size=count))
    columns = draw(st.lists(st.integers(0, 13), min_size=count, max_size=count))
    rows = draw(st.lists(st.integers(0, 13), min_size=count, max_size=count))
    logits = np.array(draw(st.lists(st.floats(-12, 12), min_size=count, max_size=count)))
    raised = draw(st.integers(0, count - 1))
    rise = draw(st.floats(1e-3, 20))
    positions = SlidePositions.of(slides, [50 * c + 1 for c in columns], [50 * r + 1 for r in rows])
    return logits, positions, raised, rise


@settings(max_examples=300, deadline=None)
@given(slides_with_a_raised_patch())
def test_raising_one_patch_never_lowers_another_on_the_shipped_model(case):
    logits, positions, raised, rise = case
    predictor = shipped_predictor()
    before = predictor.finish(logits, positions)
    higher = logits.copy()
    higher[raised] += rise
    after = predictor.finish(higher, positions)
    assert (after >= before - 1e-12).all(), f"patch {int(np.argmin(after - before))} fell by {float(np.min(after - before)):.3g}"


_PREDICTOR: list[Predictor] = []


def shipped_predictor() -> Predictor:
    if not _PREDICTOR:
        _PREDICTOR.append(Predictor(context=True, backend="torch"))
    return _PREDICTOR[0]


# (b) and (c) on the cross-validation's own held-out patients. tests/data/cv_logits.npz holds
# the logits the CV's fold networks (the shipped recipe, `benchmarks/cv.py --export`) gave
# their held-out patients and their own val patients; no pixels. Here the shipped scoring
# procedure is fitted on each fold's val patients, exactly as `histoscreen train` and
# `benchmarks/cv.py` fit it, and judged on that fold's held-out slides.
CV_LOGITS = Path(__file__).resolve().parent / "data" / "cv_logits.npz"


@dataclass
class Part:
    plain: np.ndarray
    tta: np.ndarray
    labels: np.ndarray
    slides: np.ndarray
    positions: SlidePositions

    def subset(self, rows: np.ndarray) -> Part:
        slides = self.slides[rows]
        return Part(self.plain[rows], self.tta[rows], self.labels[rows], slides,
                    SlidePositions(slides.astype(object), self.positions.columns[rows], self.positions.rows[rows], self.positions.known[rows]))


@functools.cache
def cv_logits() -> tuple[list[tuple[Part, Part]], set[str], dict]:
    """Per fold (held-out patients, val patients), the complete slides, the fold networks' settings."""
    saved = np.load(CV_LOGITS)
    names = saved["names"]
    folds = []
    for fold in np.unique(saved["fold"]):
        parts = []
        for part in (0, 1):
            rows = (saved["fold"] == fold) & (saved["part"] == part)
            slides = names[saved["patient"][rows]]
            positions = SlidePositions.of(slides, saved["column"][rows].astype(int) * 50 + 1, saved["row"][rows].astype(int) * 50 + 1)
            parts.append(Part(saved["plain"][rows].astype(np.float64), saved["tta"][rows].astype(np.float64), saved["label"][rows], slides, positions))
        folds.append(tuple(parts))
    return folds, set(names[saved["complete"]].tolist()), json.loads(str(saved["training_config"]))


def shipped_procedure() -> tuple[ThresholdRule, str]:
    """The threshold rule and context model the shipped scoring was fitted with."""
    procedure = load_metadata(shipped_model_path()).validation.procedure
    assert procedure is not None, "the shipped model does not record how its scoring was fitted"
    return ThresholdRule(**procedure["threshold_rule"]), procedure["context_model"]


def fitted_on_val(held_out: Part, val: Part) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    """The shipped procedure fitted on one fold's val patients: scores any of its held-out patches."""
    rule, context_model = shipped_procedure()
    scoring, _ = fit_scoring(val.labels, val.plain, val.tta, positions=val.positions, rule=rule, context_model=context_model)

    def score(rows: np.ndarray) -> tuple[np.ndarray, float]:
        part = held_out.subset(rows)
        return scored(scoring, scoring.plain.calibrated(part.plain), part.positions, tta=False, context=True)

    return score


def test_the_cross_validation_measured_the_shipped_recipe():
    """The fold networks whose logits these are were trained with the shipped model's settings."""
    _, _, config = cv_logits()
    shipped = load_metadata(shipped_model_path()).training["config"]
    differ = {k: (config.get(k), shipped.get(k)) for k in set(config) | set(shipped) if k != "split" and config.get(k) != shipped.get(k)}
    assert not differ, f"the CV's fold networks and the shipped network differ in {differ}: rerun benchmarks/cv.py --export"


def test_no_idc_slide_is_under_called_among_the_held_out_complete_slides():
    folds, complete, _ = cv_logits()
    burdens = []
    for held_out, val in folds:
        rows = np.arange(len(held_out.labels))
        probabilities, threshold = fitted_on_val(held_out, val)(rows)
        burdens += slide_burdens(held_out.slides, held_out.labels, probabilities >= threshold, only=complete)
    figures = slide_figures(burdens)
    assert figures["slides"] == len(complete) == 34
    assert figures["idc_slides"] >= 15
    assert figures["under_called"] == [], f"IDC slides under-called: {figures['under_called']}"


def test_a_third_of_a_complete_slide_is_called_as_with_the_whole_slide_present():
    folds, complete, _ = cv_logits()
    for held_out, val in folds:
        checked = partial_slide_check(fitted_on_val(held_out, val), held_out.slides, held_out.labels, complete)
        assert checked["slides"] >= 8
        assert abs(checked["accuracy_change"]) <= 0.015, checked
        assert checked["burden_change_mean"] <= 0.03, checked


@pytest.mark.real_data
def test_the_shipped_model_under_calls_no_complete_real_val_slide_and_holds_on_a_third_of_one(real_full_val_patches, tmp_path):
    """End to end through the Predictor, on the 10 complete slides of the official val
    patients (every recovered patch; the shipped network never trained on them, though its
    scoring was fitted there)."""
    from histoscreen.data import PatchStore, StoreSource, prepare

    prepare(real_full_val_patches, tmp_path / "store")
    batch = StoreSource(PatchStore(tmp_path / "store")).read_all()
    complete = {slide for slide, whole in complete_slides(batch.positions, batch.labels).items() if whole}
    assert len(complete) == 10
    predictor = Predictor()
    logits = predictor.patch_logits(batch.pixels)

    def score(rows: np.ndarray) -> tuple[np.ndarray, float]:
        return predictor.finish(logits[rows], SlidePositions.of(batch.patients[rows], batch.xs[rows], batch.ys[rows])), predictor.threshold

    calls = score(np.arange(len(batch)))[0] >= predictor.threshold
    figures = slide_figures(slide_burdens(batch.patients, batch.labels, calls, only=complete))
    assert figures["idc_slides"] == 3 and figures["under_called"] == [], figures
    checked = partial_slide_check(score, batch.patients, batch.labels, complete)
    assert abs(checked["accuracy_change"]) <= 0.015 and checked["burden_change_mean"] <= 0.03, checked
