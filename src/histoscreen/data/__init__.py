"""Data stage: the Kaggle layout, patch sources, the packed store, patient splits and synthetic slides."""

from histoscreen.data.naming import PatchName, parse_patch_name, patch_file_name
from histoscreen.data.sources import (
    NO_LABEL,
    Conflict,
    FileSource,
    PatchBatch,
    PatchSource,
    Problem,
    SlidePositions,
    StoreSource,
)
from histoscreen.data.inputs import SlideReading, open_sources
from histoscreen.data.store import PatchStore
from histoscreen.data.ingest import PrepareSummary, prepare
from histoscreen.data.splits import (
    PatientSplit,
    SplitSpec,
    csv_split,
    kfold_splits,
    official_split,
)
from histoscreen.data.synthetic import SyntheticSlide, generate_slide, synthesize

__all__ = [
    "NO_LABEL",
    "Conflict",
    "FileSource",
    "PatchBatch",
    "PatchName",
    "PatchSource",
    "PatchStore",
    "PatientSplit",
    "PrepareSummary",
    "Problem",
    "SlideReading",
    "SlidePositions",
    "SplitSpec",
    "StoreSource",
    "SyntheticSlide",
    "csv_split",
    "generate_slide",
    "kfold_splits",
    "official_split",
    "open_sources",
    "parse_patch_name",
    "patch_file_name",
    "prepare",
    "synthesize",
]
