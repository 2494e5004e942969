"""Patient-level splits. Patches of one patient never sit on both sides of a split.

A random patch split puts neighbouring patches of one slide in train and test and
inflates every figure, so every split here is made of patients and checked for overlap.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histoscreen.checks import choice, whole_number
from histoscreen.errors import InputError, SettingError
from histoscreen.data.naming import patient_sort_key

if TYPE_CHECKING:
    import pandas as pd

SPLIT_NAMES = ("train", "val", "test")
SPLIT_SCHEMES = ("official", "kfold", "csv", "all")  # all: every patient is a val (calibration) patient


@dataclass(frozen=True)
class PatientSplit:
    """Disjoint sets of patient ids; creating one with an overlap is an error."""

    train: frozenset[str]
    val: frozenset[str]
    test: frozenset[str]
    name: str = "custom"

    def __post_init__(self) -> None:
        for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = getattr(self, first) & getattr(self, second)
            if shared:
                listed = ", ".join(sorted(shared, key=patient_sort_key)[:10])
                raise InputError(
                    f"split {self.name!r}: {len(shared)} patients are in both {first} and {second}: {listed}"
                )

    def patients(self, split: str) -> frozenset[str]:
        choice("split", split, SPLIT_NAMES)
        return getattr(self, split)

    def split_of(self, patient: str) -> str | None:
        return next((s for s in SPLIT_NAMES if patient in getattr(self, s)), None)

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd  # where a table is built: screening a slide needs no pandas start-up

        rows = [(p, s) for s in SPLIT_NAMES for p in sorted(getattr(self, s), key=patient_sort_key)]
        return pd.DataFrame(rows, columns=["patient", "split"])


@cache
def official_lists() -> dict[str, tuple[str, ...]]:
    """The 84/29/49 patient lists of Janowczyk & Madabhushi (2016), shipped with the package."""
    folder = resources.files("histoscreen.data") / "official_split"
    return {
        split: tuple(line.strip() for line in (folder / f"{split}.txt").read_text().splitlines() if line.strip())
        for split in SPLIT_NAMES
    }


def official_split(patients: Iterable[str] | None = None, *, extra_to_train: bool = False) -> PatientSplit:
    """The official split, restricted to `patients` when given.

    Patients in none of the official lists are left out, unless `extra_to_train`, which
    adds them to train only: they must never change what val and test measure.
    """
    lists = {split: frozenset(ids) for split, ids in official_lists().items()}
    if patients is None:
        return PatientSplit(lists["train"], lists["val"], lists["test"], name="official")
    present = frozenset(patients)
    train = lists["train"] & present
    if extra_to_train:
        train |= present - lists["train"] - lists["val"] - lists["test"]
    return PatientSplit(train, lists["val"] & present, lists["test"] & present, name="official")


def kfold_splits(
    patient_table: pd.DataFrame, folds: int, *, seed: int = 0, exclude: Iterable[str] = ()
) -> list[PatientSplit]:
    """Stratified k-fold over patients: each round holds one fold out as val.

    `patient_table` has columns patient, patches, idc_patches (see PatchStore.patient_table).
    Patients are ranked by their IDC fraction and dealt to folds in blocks of `folds`, so
    every fold gets patients across the range of tumour burden. `exclude` (e.g. the
    official test patients) takes patients out of every round.
    """
    whole_number("folds", folds, low=2)
    excluded = set(exclude)
    table = patient_table[~patient_table["patient"].isin(excluded)]
    if len(table) < folds:
        raise InputError(f"{folds} folds need at least {folds} patients; only {len(table)} available")
    rng = np.random.default_rng(seed)
    shuffled = table.iloc[rng.permutation(len(table))]
    fraction = shuffled["idc_patches"].to_numpy() / np.maximum(shuffled["patches"].to_numpy(), 1)
    ranked = shuffled["patient"].to_numpy()[np.argsort(fraction, kind="stable")]
    fold_of = np.empty(len(ranked), dtype=int)
    for start in range(0, len(ranked), folds):
        block = slice(start, start + folds)
        fold_of[block] = rng.permutation(folds)[: len(ranked[block])]
    everyone = frozenset(ranked.tolist())
    rounds = []
    for fold in range(folds):
        held_out = frozenset(ranked[fold_of == fold].tolist())
        rounds.append(PatientSplit(everyone - held_out, held_out, frozenset(), name=f"kfold-{fold + 1}-of-{folds}"))
    return rounds


def csv_split(path: str | os.PathLike) -> PatientSplit:
    """A user's split: a CSV with columns patient and split (train, val or test)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such split file")
    members: dict[str, set[str]] = {s: set() for s in SPLIT_NAMES}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"patient", "split"} <= set(reader.fieldnames):
            raise InputError(f"{path}: needs a header with columns 'patient' and 'split'")
        for line, row in enumerate(reader, start=2):
            patient, split = (row["patient"] or "").strip(), (row["split"] or "").strip().lower()
            if not patient:
                raise InputError(f"{path}, line {line}: empty patient id")
            if split not in members:
                raise InputError(
                    f"{path}, line {line}: split {row['split']!r} is not one of {', '.join(SPLIT_NAMES)}"
                )
            members[split].add(patient)
    return PatientSplit(*(frozenset(members[s]) for s in SPLIT_NAMES), name=path.name)


@dataclass(frozen=True)
class SplitSpec:
    """Which patient split to use, by name: the one description train, calibrate, evaluate
    and splits share.

    scheme: 'official' (the published lists; `extra_to_train` adds unlisted patients to
    train), 'kfold' (round `fold` of `folds`, 1-based, fold assignment seeded by `seed`;
    the official test patients are always left out) or 'csv' (`csv_path`).
    """

    scheme: str = "official"
    folds: int = 5
    fold: int = 1
    seed: int = 0
    csv_path: str | None = None
    extra_to_train: bool = False

    def __post_init__(self) -> None:
        choice("split_scheme", self.scheme, SPLIT_SCHEMES)
        if self.scheme == "kfold":
            whole_number("fold", self.fold, high=whole_number("folds", self.folds, low=2))
        if self.scheme == "csv" and self.csv_path is None:
            raise SettingError("split_csv", "is needed by the csv split scheme: a CSV file with columns patient,split")

    def resolve(self, patient_table: pd.DataFrame) -> PatientSplit:
        """This split of the patients of `patient_table` (see PatchStore.patient_table)."""
        if self.scheme == "official":
            return official_split(patient_table["patient"].tolist(), extra_to_train=self.extra_to_train)
        if self.scheme == "kfold":
            return self.kfold_rounds(patient_table)[self.fold - 1]
        if self.scheme == "all":  # a lab's own labelled patients, all of them to calibrate on
            return PatientSplit(frozenset(), frozenset(patient_table["patient"].astype(str)), frozenset(), name="all")
        return csv_split(self.csv_path)

    def kfold_rounds(self, patient_table: pd.DataFrame) -> list[PatientSplit]:
        return kfold_splits(patient_table, self.folds, seed=self.seed, exclude=official_lists()["test"])
