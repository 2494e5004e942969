"""Data stage: the Kaggle layout, the packed store, patient splits and synthetic slides."""

from histoscreen.data.naming import PatchName, parse_patch_name, patch_file_name
from histoscreen.data.ingest import PrepareSummary, Reject, prepare
from histoscreen.data.store import PatchStore
from histoscreen.data.splits import (
    PatientSplit,
    csv_split,
    kfold_splits,
    official_split,
)
from histoscreen.data.synthetic import SyntheticSlide, generate_slide, synthesize

__all__ = [
    "PatchName",
    "PatchStore",
    "PatientSplit",
    "PrepareSummary",
    "Reject",
    "SyntheticSlide",
    "csv_split",
    "generate_slide",
    "kfold_splits",
    "official_split",
    "parse_patch_name",
    "patch_file_name",
    "prepare",
    "synthesize",
]
