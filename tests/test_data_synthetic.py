"""Synthetic slides: deterministic, Kaggle-named, H&E-like colours, IDC as dense dark blobs."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from histoscreen.constants import PATCH_SIZE, SYNTHETIC_PATIENT_BASE
from histoscreen.data import generate_slide, parse_patch_name, synthesize


def test_same_seed_same_pixels_other_seed_other_pixels():
    first, again, other = generate_slide(2, seed=1), generate_slide(2, seed=1), generate_slide(2, seed=2)
    np.testing.assert_array_equal(first.rgb, again.rgb)
    assert first.rgb.shape != other.rgb.shape or not np.array_equal(first.rgb, other.rgb)


def test_written_patches_follow_the_kaggle_layout_and_the_drawn_slide(tmp_path):
    summaries = synthesize(tmp_path / "slides", patients=2, seed=4)
    files = sorted((tmp_path / "slides").rglob("*.png"))
    assert len(files) == sum(s.patches for s in summaries)
    slide = generate_slide(0, seed=4)
    for path in files:
        name = parse_patch_name(path.name)
        assert name is not None and int(name.patient) >= SYNTHETIC_PATIENT_BASE
        assert path.parent.name == str(name.label) and path.parent.parent.name == name.patient
        if name.patient == slide.patient:
            pixels = np.asarray(Image.open(path))
            expected = slide.rgb[name.y - 1 : name.y - 1 + PATCH_SIZE, name.x - 1 : name.x - 1 + PATCH_SIZE]
            np.testing.assert_array_equal(pixels, expected)
    assert any(s.edge_patches > 0 for s in summaries)


def test_about_28_percent_idc_overall_and_idc_looks_like_dense_dark_nuclei():
    labels = Counter()
    tumour, stroma = [], []
    for index in range(12):
        slide = generate_slide(index, seed=0)
        for name, pixels in slide.patches():
            labels[name.label] += 1
        brightness = slide.rgb.mean(axis=2)
        if slide.idc.any():
            tumour.append(brightness[slide.idc].mean())
        stroma.append(brightness[slide.tissue & ~slide.idc].mean())
    share = labels[1] / (labels[0] + labels[1])
    assert 0.22 <= share <= 0.34, share
    assert np.mean(tumour) < np.mean(stroma) - 25  # IDC regions are clearly darker (dense nuclei)


def test_requested_tumour_share_is_honoured():
    none = generate_slide(0, seed=0, idc_fraction=0.0)
    assert not none.idc.any()
    half = generate_slide(0, seed=0, idc_fraction=0.5)
    assert abs(half.idc.sum() / half.tissue.sum() - 0.5) < 0.02
