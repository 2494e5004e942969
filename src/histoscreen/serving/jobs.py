"""Jobs and reviews, kept in SQLite under the service's data folder, with each job's files
(upload, report) in a folder of its own.

SQLite in WAL mode lets the web server read while a screening worker writes; every change
is one short transaction, so a killed process never leaves a half-written job.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from histoscreen.atomic import atomic_write_text

JOB_ID = re.compile(r"[0-9a-f]{13}-[0-9a-f]{12}")  # what new_id makes

JOB_STATES = ("queued", "running", "done", "failed")
SHIPPED_VERSION = "shipped"  # the model the server was started with; never changed
OPTIONS_FILE = "options.json"  # in a job's folder, beside input/ and report/
VERDICTS = ("agree", "disagree", "needs second look")

SCHEMA = """
create table if not exists jobs (
    id text primary key,
    name text not null,
    kind text not null,          -- 'patches' (a zip of PNGs), 'slide' (a whole-slide image) or 'adapt' (a model version built from reviewed jobs)
    status text not null,
    progress real not null default 0,
    error text,
    created text not null,
    started text,
    finished text,
    worker integer,
    attempts integer not null default 0
);
create table if not exists reviews (
    job text not null,
    slide text not null,
    verdict text not null,
    note text not null,
    created text not null
);
create index if not exists reviews_by_slide on reviews (job, slide);
create table if not exists tile_marks (  -- a reviewer's label of one screened tile: ground truth for calibration
    job text not null,
    slide text not null,
    x integer not null,
    y integer not null,
    label integer not null,      -- 1 IDC, 0 not IDC
    marked text not null,
    primary key (job, slide, x, y)
);
create table if not exists model_versions (  -- calibrated from reviewed jobs; the model files under models/<id>/
    id text primary key,         -- the id of the adapt job that built it
    name text not null,
    created text not null,
    based_on text not null,      -- the version it was calibrated from
    jobs text not null,          -- JSON: the screening jobs whose labels calibrated it
    weights_sha256 text not null,
    scoring_sha256 text not null,
    estimate text not null       -- JSON: before/after figures, each patient called by a fit on the others
);
create table if not exists active_model (
    one integer primary key check (one = 1),
    version text not null
);
create table if not exists job_models (  -- which model version scored a job
    job text primary key,
    version text not null,
    name text not null,
    weights_sha256 text not null,
    scoring_sha256 text not null
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    name: str
    kind: str
    status: str
    progress: float
    error: str | None
    created: str
    finished: str | None

    def public(self) -> dict:
        return asdict(self)


class JobStore:
    def __init__(self, data: Path):
        self.data = Path(data)
        self.data.mkdir(parents=True, exist_ok=True)
        (self.data / "jobs").mkdir(exist_ok=True)
        self.path = self.data / "histoscreen.sqlite"
        with self._connect() as db:
            db.execute("pragma journal_mode = wal")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def folder(self, job_id: str) -> Path:
        return self.data / "jobs" / job_id

    @staticmethod
    def is_id(text: str) -> bool:
        return JOB_ID.fullmatch(text) is not None

    def new_id(self) -> str:
        # time-ordered and unguessable: newest-first listing, no enumeration of others' jobs
        return f"{int(time.time() * 1000):013x}-{secrets.token_hex(6)}"

    def screening_options(self, job_id: str) -> dict:
        """What the submitter asked of the screening (today: the pixel size, `mpp`)."""
        try:
            return json.loads((self.folder(job_id) / OPTIONS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def add(self, job_id: str, name: str, kind: str, options: dict | None = None) -> Job:
        """Queue a job whose input is in place; its `options` are written before it can be claimed."""
        if options:
            atomic_write_text(self.folder(job_id) / OPTIONS_FILE, json.dumps(options))
        with self._connect() as db:
            db.execute("insert into jobs (id, name, kind, status, created) values (?, ?, ?, 'queued', ?)", (job_id, name, kind, now()))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("select * from jobs where id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def all(self) -> list[Job]:
        with self._connect() as db:
            return [_job(r) for r in db.execute("select * from jobs order by created desc, id desc")]

    def count(self, status: str) -> int:
        with self._connect() as db:
            return db.execute("select count(*) from jobs where status = ?", (status,)).fetchone()[0]

    def claim(self, worker: int) -> Job | None:
        """The oldest queued job, now running for `worker`; None when the queue is empty."""
        with self._connect() as db:
            db.execute("begin immediate")
            row = db.execute("select id from jobs where status = 'queued' order by created, id limit 1").fetchone()
            if row is None:
                db.execute("commit")
                return None
            db.execute(
                "update jobs set status = 'running', started = ?, progress = 0, worker = ?, attempts = attempts + 1 where id = ?",
                (now(), worker, row["id"]),
            )
            db.execute("commit")
        return self.get(row["id"])

    def progress(self, job_id: str, fraction: float) -> None:
        with self._connect() as db:
            db.execute("update jobs set progress = ? where id = ? and status = 'running'", (min(max(fraction, 0.0), 1.0), job_id))

    def finish(self, job_id: str, error: str | None = None) -> None:
        status = "failed" if error else "done"
        with self._connect() as db:
            db.execute("update jobs set status = ?, error = ?, finished = ?, progress = ? where id = ?",
                       (status, error, now(), 0.0 if error else 1.0, job_id))

    def recover(self, max_attempts: int = 2) -> list[str]:
        """After a restart: a job left running by a worker that died is queued again, or
        failed once it has been tried `max_attempts` times (a job that kills its worker must
        not kill every worker after it)."""
        recovered = []
        with self._connect() as db:
            db.execute("begin immediate")
            for row in db.execute("select id, attempts from jobs where status = 'running'").fetchall():
                if row["attempts"] >= max_attempts:
                    db.execute("update jobs set status = 'failed', error = ?, finished = ? where id = ?",
                               (f"interrupted {row['attempts']} times (the service stopped while it ran); not retried", now(), row["id"]))
                else:
                    db.execute("update jobs set status = 'queued', progress = 0, worker = null, error = ? where id = ?",
                               ("interrupted by a restart of the service; queued again", row["id"]))
                recovered.append(row["id"])
            db.execute("commit")
        return recovered

    def fail_worker_jobs(self, worker: int, reason: str) -> list[str]:
        """The jobs a dead worker was running fail with `reason`: a job that killed its worker
        (the kernel's out-of-memory killer, say) is not handed to the next one."""
        with self._connect() as db:
            db.execute("begin immediate")
            rows = db.execute("select id from jobs where status = 'running' and worker = ?", (worker,)).fetchall()
            for row in rows:
                db.execute("update jobs set status = 'failed', error = ?, finished = ?, progress = 0 where id = ?", (reason, now(), row["id"]))
            db.execute("commit")
        return [row["id"] for row in rows]

    def remove_orphans(self) -> list[str]:
        """Job folders no job owns (an upload killed mid-extraction): removed at start."""
        with self._connect() as db:
            known = {row["id"] for row in db.execute("select id from jobs")}
        orphans = [folder for folder in (self.data / "jobs").iterdir() if folder.name not in known]
        for folder in orphans:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
        return [folder.name for folder in orphans]

    def review(self, job_id: str, slide: str, verdict: str, note: str) -> dict:
        created = now()
        with self._connect() as db:
            db.execute("insert into reviews (job, slide, verdict, note, created) values (?, ?, ?, ?, ?)", (job_id, slide, verdict, note, created))
        return {"slide": slide, "verdict": verdict, "note": note, "reviewed": created}

    def reviews(self, job_id: str) -> dict[str, dict]:
        """The latest review of each slide of a job."""
        with self._connect() as db:
            rows = db.execute("select * from reviews where job = ? order by rowid", (job_id,)).fetchall()
        return {r["slide"]: {"verdict": r["verdict"], "note": r["note"], "reviewed": r["created"]} for r in rows}


    def mark_tiles(self, job_id: str, slide: str, marks: list[tuple[int, int, int | None]]) -> int:
        """Set (label 0 or 1) or clear (None) a reviewer's label of tiles x, y; all or none."""
        marked = now()
        with self._connect() as db:
            for x, y, label in marks:
                if label is None:
                    db.execute("delete from tile_marks where job = ? and slide = ? and x = ? and y = ?", (job_id, slide, x, y))
                else:
                    db.execute("insert or replace into tile_marks (job, slide, x, y, label, marked) values (?, ?, ?, ?, ?, ?)",
                               (job_id, slide, x, y, label, marked))
        return len(marks)

    def tile_marks(self, job_id: str, slide: str | None = None) -> list[dict]:
        """A job's tile labels (one slide's, or all), in the order of slide, y, x."""
        query, values = "select * from tile_marks where job = ?", [job_id]
        if slide is not None:
            query, values = query + " and slide = ?", values + [slide]
        with self._connect() as db:
            rows = db.execute(query + " order by slide, y, x", values).fetchall()
        return [{"slide": r["slide"], "x": r["x"], "y": r["y"], "label": r["label"], "marked": r["marked"]} for r in rows]


    # ---- model versions: calibrated from reviewed jobs, one of them active ----------------

    def version_folder(self, version: str) -> Path:
        return self.data / "models" / version

    def add_version(self, version: str, name: str, based_on: str, jobs: list[str], digests: dict[str, str], estimate: dict) -> None:
        with self._connect() as db:
            db.execute("insert into model_versions (id, name, created, based_on, jobs, weights_sha256, scoring_sha256, estimate) "
                       "values (?, ?, ?, ?, ?, ?, ?, ?)",
                       (version, name, now(), based_on, json.dumps(jobs), digests["weights"], digests["scoring"], json.dumps(estimate)))

    def versions(self) -> list[dict]:
        """The calibrated versions, newest first (the shipped model is not among them)."""
        with self._connect() as db:
            rows = db.execute("select * from model_versions order by created desc, id desc").fetchall()
        return [{"id": r["id"], "name": r["name"], "created": r["created"], "based_on": r["based_on"], "jobs": json.loads(r["jobs"]),
                 "weights_sha256": r["weights_sha256"], "scoring_sha256": r["scoring_sha256"], "estimate": json.loads(r["estimate"])}
                for r in rows]

    def version_model(self, version: str, shipped: str | None) -> tuple[str, str]:
        """(name, model path) of a version: a calibrated one's folder, or `shipped`, the
        server's own model (the package's shipped model when None)."""
        if version == SHIPPED_VERSION:
            from histoscreen.models.bundle import shipped_model_path

            path = shipped or str(shipped_model_path())
            return f"shipped ({Path(path).stem})", path
        with self._connect() as db:
            row = db.execute("select name from model_versions where id = ?", (version,)).fetchone()
        return (row["name"] if row else version), str(self.version_folder(version))

    def has_version(self, version: str) -> bool:
        with self._connect() as db:
            return db.execute("select 1 from model_versions where id = ?", (version,)).fetchone() is not None

    def active_version(self) -> str:
        with self._connect() as db:
            row = db.execute("select version from active_model").fetchone()
        return row["version"] if row else SHIPPED_VERSION

    def activate(self, version: str) -> None:
        with self._connect() as db:
            db.execute("insert or replace into active_model (one, version) values (1, ?)", (version,))

    def record_job_model(self, job_id: str, version: str, name: str, digests: dict[str, str]) -> None:
        with self._connect() as db:
            db.execute("insert or replace into job_models (job, version, name, weights_sha256, scoring_sha256) values (?, ?, ?, ?, ?)",
                       (job_id, version, name, digests["weights"], digests["scoring"]))

    def job_model(self, job_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("select * from job_models where job = ?", (job_id,)).fetchone()
        return {k: row[k] for k in ("version", "name", "weights_sha256", "scoring_sha256")} if row else None

def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["name"], row["kind"], row["status"], row["progress"], row["error"], row["created"], row["finished"])


def default_data_folder() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "histoscreen"
