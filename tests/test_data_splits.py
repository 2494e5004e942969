"""Patient-level splits: the official lists, stratified k-fold, user CSVs, overlap checks."""

from __future__ import annotations

import pandas as pd
import pytest

from histoscreen import HistoscreenError
from histoscreen.data import PatientSplit, csv_split, kfold_splits, official_split
from histoscreen.data.splits import official_lists

from conftest import shared_data_folder


def test_official_split_is_exactly_the_published_84_29_49_lists():
    split = official_split()
    assert (len(split.train), len(split.val), len(split.test)) == (84, 29, 49)
    assert not (split.train & split.val or split.train & split.test or split.val & split.test)
    shared = shared_data_folder()
    if shared is not None:  # the lists shipped in the package are the ones in ../shared
        for name in ("train", "val", "test"):
            published = {line.strip() for line in (shared / f"cases_{name}.txt").read_text().split()}
            assert split.patients(name) == published


def test_official_split_restricted_to_present_patients_and_extras_only_join_train():
    lists = official_lists()
    present = [lists["train"][0], lists["train"][1], lists["val"][0], lists["test"][0], "777777", "888888"]
    plain = official_split(present)
    assert plain.train == {lists["train"][0], lists["train"][1]}
    assert plain.val == {lists["val"][0]} and plain.test == {lists["test"][0]}
    assert plain.split_of("777777") is None
    extended = official_split(present, extra_to_train=True)
    assert extended.train == plain.train | {"777777", "888888"}
    assert extended.val == plain.val and extended.test == plain.test


def test_an_overlapping_split_is_an_error():
    with pytest.raises(HistoscreenError, match="2 patients are in both train and test: 1, 2"):
        PatientSplit(frozenset({"1", "2", "3"}), frozenset({"4"}), frozenset({"1", "2"}))


def patient_table(count: int) -> pd.DataFrame:
    patches = [100 + 7 * i for i in range(count)]
    return pd.DataFrame(
        {"patient": [str(9000 + i) for i in range(count)], "patches": patches, "idc_patches": [(i * 37) % 90 for i in range(count)]}
    )


def test_kfold_holds_each_patient_out_exactly_once_and_never_on_both_sides():
    table = patient_table(23)
    rounds = kfold_splits(table, 5, seed=3, exclude=["9000", "9001"])
    everyone = set(table.patient) - {"9000", "9001"}
    held_out = [p for split in rounds for p in split.val]
    assert sorted(held_out) == sorted(everyone)
    for split in rounds:
        assert not split.train & split.val
        assert split.train | split.val == everyone
        assert len(split.val) in (4, 5)
    assert [r.val for r in rounds] == [r.val for r in kfold_splits(table, 5, seed=3, exclude=["9000", "9001"])]
    assert [r.val for r in rounds] != [r.val for r in kfold_splits(table, 5, seed=4, exclude=["9000", "9001"])]


def test_kfold_spreads_tumour_burden_across_folds():
    table = patient_table(40)
    fraction = dict(zip(table.patient, table.idc_patches / table.patches))
    rounds = kfold_splits(table, 4, seed=0)
    means = [sum(fraction[p] for p in r.val) / len(r.val) for r in rounds]
    assert max(means) - min(means) < 0.1, means


def test_kfold_needs_enough_patients():
    with pytest.raises(HistoscreenError, match="at least 5 patients"):
        kfold_splits(patient_table(3), 5)


def test_csv_split_reads_and_checks(tmp_path):
    good = tmp_path / "split.csv"
    good.write_text("patient,split\n10253,train\n8863,val\n9036,TEST\n")
    split = csv_split(good)
    assert (split.train, split.val, split.test) == ({"10253"}, {"8863"}, {"9036"})
    overlapping = tmp_path / "overlap.csv"
    overlapping.write_text("patient,split\n10253,train\n10253,val\n")
    with pytest.raises(HistoscreenError, match="in both train and val: 10253"):
        csv_split(overlapping)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("patient,split\n10253,holdout\n")
    with pytest.raises(HistoscreenError, match="line 2: split 'holdout'"):
        csv_split(unknown)
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("10253,train\n")
    with pytest.raises(HistoscreenError, match="columns 'patient' and 'split'"):
        csv_split(headerless)
