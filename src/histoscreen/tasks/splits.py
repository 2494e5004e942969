"""`splits`: how a store's patients fall into a patient split (every round of a k-fold
scheme), counted by patients, patches and IDC patches. Computes; the CLI prints and writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from histoscreen.data.splits import SPLIT_NAMES, PatientSplit, SplitSpec
from histoscreen.data.store import PatchStore


@dataclass(frozen=True)
class SplitPart:
    name: str  # train, val or test
    patients: int
    patches: int
    idc_patches: int


@dataclass(frozen=True)
class SplitSummary:
    split: PatientSplit
    parts: list[SplitPart]
    unassigned: int  # the store's patients in no part of this split

    def to_frame(self) -> pd.DataFrame:
        """patient, split, round: one row per assigned patient."""
        return self.split.to_frame().assign(round=self.split.name)


def describe_splits(store_path: str | os.PathLike, spec: SplitSpec = SplitSpec()) -> list[SplitSummary]:
    """The split `spec` names over the patients of a store: one summary, or one per k-fold round."""
    store = PatchStore(store_path)
    table = store.patient_table()
    splits = spec.kfold_rounds(table) if spec.scheme == "kfold" else [spec.resolve(table)]
    by_patient = table.set_index("patient")
    summaries = []
    for split in splits:
        parts = []
        for name in SPLIT_NAMES:
            members = [p for p in split.patients(name) if p in by_patient.index]
            counts = by_patient.loc[members, ["patches", "idc_patches"]].sum() if members else {"patches": 0, "idc_patches": 0}
            parts.append(SplitPart(name, len(members), int(counts["patches"]), int(counts["idc_patches"])))
        summaries.append(SplitSummary(split, parts, sum(split.split_of(p) is None for p in store.patients)))
    return summaries
