"""Data stage: the Kaggle layout, patch sources, the packed store, patient splits and synthetic slides.

Names are imported on first use: screening a slide file reads no store and needs no pandas."""

from histoscreen.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("PatchName", "parse_patch_name", "patch_file_name"), "histoscreen.data.naming"),
    **dict.fromkeys(
        ("NO_LABEL", "Conflict", "FileSource", "PatchBatch", "PatchSource", "Problem", "SlidePositions", "StoreSource"),
        "histoscreen.data.sources",
    ),
    **dict.fromkeys(("SlideReading", "open_sources"), "histoscreen.data.inputs"),
    "PatchStore": "histoscreen.data.store",
    **dict.fromkeys(("PrepareSummary", "prepare"), "histoscreen.data.ingest"),
    **dict.fromkeys(("PatientSplit", "SplitSpec", "csv_split", "kfold_splits", "official_split"), "histoscreen.data.splits"),
    **dict.fromkeys(("SyntheticSlide", "generate_slide", "synthesize"), "histoscreen.data.synthetic"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
