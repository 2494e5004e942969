"""Real patches of the official val patients (skipped when ../shared is absent)."""

from __future__ import annotations

from collections import Counter

from histoscreen.constants import PATCH_SIZE
from histoscreen.data import PatchStore, official_split, prepare


def test_prepare_real_val_patches_matches_what_unpack_wrote(real_val_patches, tmp_path):
    folder, expected = real_val_patches
    summary = prepare(folder, tmp_path / "store")
    store = PatchStore(tmp_path / "store")

    assert summary.rejects == [] and summary.conflicts == [] and summary.duplicates == 0
    stored = Counter(zip(store.index.patient, store.index.label.astype(str)))
    assert stored == expected
    assert len(store) == sum(expected.values())
    assert set(store.patients) == official_split().val  # all 29 official val patients
    # Real edge patches are smaller than 50x50 and keep their true size.
    edge = store.index[(store.index.width < PATCH_SIZE) | (store.index.height < PATCH_SIZE)]
    assert len(edge) > 0 and (edge.width >= 1).all() and (edge.height >= 1).all()
