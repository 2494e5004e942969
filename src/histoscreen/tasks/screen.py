"""`screen`: a batch of slides scored one at a time, each with its tumour burden, regions,
uncertain patches and explanations.

`Screening` computes; it writes nothing. Iterating over it screens the slides one after
another, so memory is bounded by the largest slide, not the batch; the report writer
(report.write_screening_report), a web handler or a Ray worker decides what to keep.
One unreadable patch or one broken slide becomes a problem, never the end of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path


from histoscreen import __version__
from histoscreen.constants import PATCH_NAME_HINT
from histoscreen.data.inputs import SlideReading, open_sources
from histoscreen.data.sources import PatchSource
from histoscreen.data.wsi import TissueSettings, check_pixel_size_setting
from histoscreen.problems import Problem
from histoscreen.errors import InputError
from histoscreen.progress import Progress, silent
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.ray_engine import RayEngine, RayPool
from histoscreen.tasks.slides import UNCERTAIN_MARGIN
from histoscreen.tasks.steps import EXPLAINED_PER_KIND, SlideOptions, SlideResult, read_truth, screen_slide


class Screening:
    """The slides of `inputs` (Kaggle-layout folders, folders of named patches, stores,
    whole-slide image files or folders of them), screened with one model when iterated over.

    `context` (blend each patch with its neighbours on the slide) defaults to on when the
    model has a slide-context calibration. Ground truth comes from `labels` (CSV files, or
    GeoJSON annotations named after their slides: data/annotations.py), else from
    the class in the file names unless `use_name_labels` is False. `mpp` is the inputs' µm
    per pixel: a whole-slide image's level 0 (where its metadata lacks it or is wrong), or the
    patches' own (default: the model's spacing, 4 µm/px for the Kaggle set), for areas in mm².
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        model: str | os.PathLike | None = None,
        tta: bool = False,
        context: bool | None = None,
        labels: str | os.PathLike | Sequence[str | os.PathLike] = (),
        use_name_labels: bool = True,
        device: str = "auto",
        backend: str = "auto",
        workers: int | None = None,
        mpp: float | None = None,
        tissue: TissueSettings = TissueSettings(),
        explained_per_kind: int = EXPLAINED_PER_KIND,
        engine: RayEngine | None = None,
    ):
        check_pixel_size_setting("mpp", mpp)
        self.predictor = Predictor(model, tta=tta, context=context, device=device, backend=backend)
        spacing = self.predictor.metadata.spacing_um_px
        patch_um_per_px = mpp if mpp is not None else spacing
        self.engine = engine
        reading = SlideReading(spacing, mpp, tissue)
        self.sources: list[PatchSource] = open_sources(inputs, named_only=True, workers=workers, slides=reading)
        self.failures: list[Problem] = []
        self.slides: list[tuple[PatchSource, str]] = []
        first_source: dict[str, PatchSource] = {}
        for source in self.sources:
            for slide in source.slide_ids():
                if slide in first_source:  # e.g. 9036.svs beside a folder of patient 9036's patches
                    self.failures.append(Problem(source.description, f"slide {slide} is also given by {first_source[slide].description}; "
                                                 "screened from that input only (a slide's id must be unique in a batch)"))
                    continue
                first_source[slide] = source
                self.slides.append((source, slide))
        if not self.slides:
            found = self.problems
            if found:  # say why the inputs gave nothing (a slide without a pixel size, say), not what was looked for
                more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
                raise InputError(f"nothing to screen: {found[0].where}: {found[0].reason}{more}")
            raise InputError(f"{', '.join(str(i) for i in inputs)}: no patch files named {PATCH_NAME_HINT}")
        labels = [labels] if isinstance(labels, (str, os.PathLike)) else list(labels)
        self.options = SlideOptions(read_truth(labels, self.slides) if labels else None, use_name_labels, patch_um_per_px,
                                    explained_per_kind)
        self.settings = {
            **self.predictor.settings(),
            "histoscreen_version": __version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "uncertain_margin": UNCERTAIN_MARGIN,
            "mpp": mpp,
            "patch_um_per_px": patch_um_per_px,
            "inputs": [str(Path(i).resolve()) for i in inputs],
        }

    def __len__(self) -> int:
        return len(self.slides)

    @property
    def problems(self) -> list[Problem]:
        """Everything not screened so far: files, folders and slides, with the reason."""
        found = [p for s in self.sources for p in s.problems + [c.as_problem() for c in s.conflicts]]
        return found + self.failures

    def __iter__(self) -> Iterator[SlideResult]:
        return self.results()

    def results(self, progress: Progress = silent) -> Iterator[SlideResult]:
        """The slides screened one by one; `progress` hears of each slide's patches as they
        are scored (stage "slide ID"), with the local engine."""
        for outcome in self._outcomes(progress):
            if isinstance(outcome, Problem):
                self.failures.append(outcome)
            else:
                yield outcome

    def _outcomes(self, progress: Progress) -> Iterator[SlideResult | Problem]:
        if self.engine is None:
            for source, slide_id in self.slides:
                yield screen_slide(self.predictor, self.options, source, slide_id, progress)
            return
        with RayPool(self.engine, self.predictor, self.options) as pool:
            shards = [(source.shard([slide_id]), slide_id) for source, slide_id in self.slides]
            for (source, _), outcome in zip(self.slides, pool.map("screen", shards)):
                outcome.absorb_into(source)  # what reading the shard found, as if read here
                yield outcome.value
