"""The real demo slides inside the package: small, official val patients only, and they
come back out as a Kaggle-layout folder that reads without a problem."""

from __future__ import annotations

from importlib import resources

from histoscreen.data import official_split, open_sources
from histoscreen.data.demo import DEMO_FILE, write_demo_slides


def test_the_demo_slides_are_small_val_patients_and_unpack_cleanly(tmp_path):
    packed = resources.files("histoscreen.data").joinpath("demo", DEMO_FILE)
    assert packed.stat().st_size <= 6 * 1024 * 1024
    counts = write_demo_slides(tmp_path / "slides")
    lists = official_split()
    assert set(counts) <= lists.val and not set(counts) & (lists.test | lists.train)
    [source] = open_sources([tmp_path / "slides"])
    batch = source.read_all()
    assert source.problems == [] and len(batch) == sum(counts.values()) > 3000
    assert set(batch.patients) == set(counts) and 0.1 < batch.labels.mean() < 0.5
