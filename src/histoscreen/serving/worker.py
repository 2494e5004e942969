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

from histoscreen.errors import HistoscreenError
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
        screening = Screening([folder / "input"], model=model, mpp=store.screening_options(job.id).get("mpp"))
        write_screening_report(screening, folder / "report", overwrite=True, progress=progress)
    except HistoscreenError as error:
        store.finish(job.id, str(error).replace(str(folder / "input") + os.sep, ""))  # paths as inside the upload
    except Exception as error:  # a bug must fail its job, not the worker
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
