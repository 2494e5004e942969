"""The screening worker: a process of its own that takes queued jobs one at a time and runs
the same Screening and report writer as `histoscreen screen`.

usage (started by `histoscreen serve`): python -m histoscreen.serving.worker DATA_DIR [--model M]

It dies with the server that started it (the kernel's parent-death signal on Linux, and a
check of its parent before every job and progress step), so a restarted server never finds
a job still being written by a worker it did not start.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from histoscreen.errors import HistoscreenError, InputError
from histoscreen.serving.jobs import Job, JobStore

PROGRESS_EVERY_S = 0.5


def die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent check below still applies
    if os.getppid() != parent:
        sys.exit(0)


def run_job(store: JobStore, job: Job, parent: int, model: str | None) -> None:
    """A screening job, scored by the model version active when it starts (recorded with it),
    or an adapt job."""
    if job.kind == "adapt":
        return run_adaptation(store, job, model)
    from histoscreen.models.bundle import model_digests
    from histoscreen.report.screening import SLIDES_STAGE, write_screening_report
    from histoscreen.tasks import Screening

    folder = store.folder(job.id)
    last = 0.0
    slides_done, slides = 0, 1

    def progress(stage: str, done: int, total: int) -> None:
        """Slides done, plus the share of the slide being scored (its patches)."""
        nonlocal last, slides_done, slides
        if os.getppid() != parent:
            sys.exit(0)
        if stage == SLIDES_STAGE:
            slides_done, slides, share = done, max(total, 1), 0.0
        else:
            share = done / max(total, 1)
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
            store.progress(job.id, min((slides_done + share) / slides, 1.0))
            last = time.monotonic()

    try:
        version = store.active_version()
        name, model = store.version_model(version, model)
        store.record_job_model(job.id, version, name, model_digests(model))
        screening = Screening([folder / "input"], model=model, mpp=store.screening_options(job.id).get("mpp"))
        write_screening_report(screening, folder / "report", overwrite=True, progress=progress)
    except HistoscreenError as error:
        store.finish(job.id, str(error).replace(str(folder / "input") + os.sep, ""))  # paths as inside the upload
    except Exception as error:  # a bug must fail its job, not the worker
        store.finish(job.id, f"internal error: {type(error).__name__}: {error}")
    else:
        store.finish(job.id)


def run_adaptation(store: JobStore, job: Job, shipped: str | None) -> None:
    """Calibrate a model version on the labels of reviewed screening jobs (a reviewer's tile
    marks first, the labels in patch names elsewhere), every patient a calibration patient,
    with its leave-one-patient-out estimate; written under models/<job id>/, not made active."""
    import shutil

    from histoscreen.data.splits import SplitSpec
    from histoscreen.models.bundle import DEFAULT_WEIGHTS_NAME, model_digests, save_model
    from histoscreen.tables import write_csv
    from histoscreen.tasks import calibrate

    options = store.screening_options(job.id)
    folder = store.version_folder(job.id)
    try:
        jobs, based_on = list(options["jobs"]), options["based_on"]
        _, base = store.version_model(based_on, shipped)
        folder.mkdir(parents=True, exist_ok=True)
        marks = [mark for screened in jobs for mark in store.tile_marks(screened)]
        labels = []
        if marks:
            labels = [folder / "labels.csv"]
            write_csv(labels[0], ["patient", "x", "y", "label"], [(m["slide"], m["x"], m["y"], m["label"]) for m in marks])
        pixel_sizes = {store.screening_options(screened).get("mpp") for screened in jobs}
        if len(pixel_sizes) > 1:
            raise InputError("the jobs were screened with different pixel sizes (mpp); adapt on jobs that share one")
        store.progress(job.id, 0.1)
        model, metadata = calibrate([store.folder(screened) / "input" for screened in jobs], base, split_spec=SplitSpec(scheme="all"),
                                    labels=labels, mpp=pixel_sizes.pop())
        save_model(model, metadata, folder / DEFAULT_WEIGHTS_NAME)  # a model given as its folder
        store.add_version(job.id, job.name, based_on, jobs, model_digests(folder), metadata.validation.estimate)
    except HistoscreenError as error:
        shutil.rmtree(folder, ignore_errors=True)
        store.finish(job.id, str(error).replace(str(store.data) + os.sep, ""))
    except Exception as error:  # a bug must fail its job, not the worker
        shutil.rmtree(folder, ignore_errors=True)
        store.finish(job.id, f"internal error: {type(error).__name__}: {error}")
    else:
        store.finish(job.id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="histoscreen screening worker")
    parser.add_argument("data", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--parent", type=int, default=os.getppid())
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    store = JobStore(args.data)
    while True:
        if os.getppid() != args.parent:
            return
        job = store.claim(os.getpid())
        if job is None:
            time.sleep(0.3)
            continue
        run_job(store, job, args.parent, args.model)


if __name__ == "__main__":
    main()
