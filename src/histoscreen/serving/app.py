"""`histoscreen serve`: a small, local-first web service over the same screening task.

FastAPI for the API and the pages, SQLite for jobs and reviews, files for uploads and
reports, and screening worker processes that take queued jobs one at a time. Errors are
RFC 9457 problem details (application/problem+json). With a token, every /api call needs
`Authorization: Bearer TOKEN`, compared in constant time.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from histoscreen import __version__
from histoscreen.atomic import child_path
from histoscreen.constants import GRID_STEP
from histoscreen.data.wsi import check_pixel_size_setting
from histoscreen.errors import HistoscreenError, SettingError
from histoscreen.serving import pages
from histoscreen.serving.jobs import VERDICTS, JobStore
from histoscreen.serving.uploads import UploadError, extract_patches, slide_file_name, slug, upload_kind
from histoscreen.serving.viewer import DeepZoom, LeastRecentlyUsed, SlideDeepZoom, png_bytes

PROBLEM_JSON = "application/problem+json"
STATIC = Path(__file__).resolve().parent / "static"
GIB = 1 << 30
SUPERVISE_EVERY_S = 1.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARACTERS = 12


@dataclass(frozen=True)
class ServeSettings:
    data: Path
    token: str | None = None
    model: str | None = None
    max_upload_bytes: int = 4 * GIB
    max_unzipped_bytes: int = 8 * GIB
    max_queued: int = 100
    workers: int = 1
    start_workers: bool = True
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host names answered; None: any (a public bind)

    def __post_init__(self) -> None:
        """The one check of a server's settings, whoever makes them (the CLI, a test, a script)."""
        if self.token is not None and (len(self.token) < MIN_TOKEN_CHARACTERS or not self.token.isprintable()
                                       or any(c.isspace() for c in self.token)):
            # an empty token made 'Authorization: Bearer ' a valid key
            raise SettingError("token", f"must be at least {MIN_TOKEN_CHARACTERS} printable characters without spaces, "
                               "e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
        for name, value, unit in (("parallel_jobs", self.workers, 1), ("max_upload_mb", self.max_upload_bytes, 1 << 20), ("max_unzipped_mb", self.max_unzipped_bytes, 1 << 20)):
            if value < unit:
                raise SettingError(name, f"must be at least 1, got {value // unit}")


class Review(BaseModel):
    verdict: str = Field(description=f"one of: {', '.join(VERDICTS)}")
    note: str = Field(default="", max_length=4000)


def problem(status: int, detail: str, title: str | None = None, headers: dict | None = None) -> JSONResponse:
    from http import HTTPStatus

    body = {"type": "about:blank", "title": title or HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


MAX_FORM_FREE_BODY = 1 << 20  # a JSON body (a review) is a few hundred bytes; only uploads are large
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
SECURITY_HEADERS = [
    # no inline script anywhere: what a link manages to inject cannot run
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class BodyTooLarge(HTTPException):
    """Raised while a body is read, as soon as it passes the limit; an HTTPException so that
    FastAPI's form parsing passes it on as a 413 instead of 'error parsing the body'."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request passed {limit:,} bytes; refused")


def swagger_ui_folder() -> Path:
    """Swagger UI's files (5.x: OpenAPI 3.1, which FastAPI writes), from the fastapi-offline
    wheel of the [serve] extra: /docs works offline, as the README promises for every page."""
    from importlib import resources

    return Path(str(resources.files("fastapi_offline") / "static"))


SUBMIT_FIELDS = frozenset({"file", "name", "mpp"})


def only_form_fields(known: frozenset[str]):
    """A dependency refusing a form with fields the endpoint does not read: one it ignored
    (slide_mpp for mpp, say) would screen with settings nobody asked for, without a word."""

    async def check(request: Request) -> None:
        unknown = sorted(set((await request.form()).keys()) - known)  # the form FastAPI parsed already
        if unknown:
            raise HTTPException(422, f"unknown form field {unknown[0]!r}; this endpoint takes {', '.join(sorted(known))}")

    return check


def _host_name(value: str) -> str:
    """'[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost' (lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Before any route reads a byte of the body: the Host must be one this server answers to
    (DNS rebinding), a state-changing request from a browser must come from this origin
    (cross-site forms), /api needs the token when one is set, and the body is capped (by its
    Content-Length at once, else as it arrives). Every response gets the security headers."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    def refusal(self, scope, headers: dict[str, str]) -> JSONResponse | None:
        hosts = self.settings.allowed_hosts
        if hosts is not None and _host_name(headers.get("host", "")) not in hosts:
            return problem(421, f"this server answers to {', '.join(hosts)} only, not to Host {headers.get('host', '')!r}")
        method = scope["method"]
        origin = headers.get("origin")
        if method in STATE_CHANGING and (headers.get("sec-fetch-site") == "cross-site" or (
                origin is not None and origin.split("://", 1)[-1].lower() != headers.get("host", "").lower())):
            return problem(403, f"a {method} from another site ({origin or 'cross-site'}) is refused")
        if self.settings.token is not None and scope["path"].startswith("/api"):
            expected = f"Bearer {self.settings.token}"
            if not hmac.compare_digest(headers.get("authorization", "").encode(), expected.encode()):
                return problem(401, "a valid 'Authorization: Bearer TOKEN' header is needed", headers={"WWW-Authenticate": "Bearer"})
        if method in STATE_CHANGING:
            limit = self.limit(headers)
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return problem(413, f"the request is {int(declared):,} bytes; at most {limit:,} are accepted")
        return None

    def limit(self, headers: dict) -> int:
        multipart = headers.get("content-type", "").lower().startswith("multipart/form-data")
        return self.settings.max_upload_bytes if multipart else MAX_FORM_FREE_BODY

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await refused(scope, receive, secured)
        if scope["method"] not in STATE_CHANGING:
            return await self.app(scope, receive, secured)
        limit = self.limit(headers)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, secured)


class _Chunks(io.RawIOBase):
    """A write-only stream that hands on what was written: no tell(), no seek()."""

    def __init__(self):
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        taken, self.parts = b"".join(self.parts), []
        return taken


def create_app(settings: ServeSettings) -> FastAPI:
    store = JobStore(settings.data)
    pyramids = LeastRecentlyUsed(4)
    sources = LeastRecentlyUsed(2)
    predictors = LeastRecentlyUsed(1)
    workers: list[subprocess.Popen] = []

    command = [sys.executable, "-m", "histoscreen.serving.worker", str(settings.data), "--parent", str(os.getpid())]
    if settings.model:
        command += ["--model", settings.model]
    restarts = {"count": 0}

    def supervise() -> None:
        """A worker that died (killed by the out-of-memory killer, say) fails the job it ran,
        with the reason, and is replaced."""
        for index, worker in enumerate(workers):
            code = worker.poll()
            if code is None:
                continue
            how = f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -signal.SIGKILL else "") if code < 0 else f"exit {code}"
            store.fail_worker_jobs(worker.pid, f"the screening worker died while running this job ({how}); not retried")
            workers[index] = subprocess.Popen(command)
            restarts["count"] += 1

    async def supervisor() -> None:
        while True:
            await asyncio.sleep(SUPERVISE_EVERY_S)
            await asyncio.to_thread(supervise)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.recover()
        store.remove_orphans()
        task = None
        if settings.start_workers:
            workers.extend(subprocess.Popen(command) for _ in range(settings.workers))
            task = asyncio.create_task(supervisor())
        yield
        if task is not None:
            task.cancel()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()

    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN and runs an inline script;
    # ours serves the assets of the fastapi-offline wheel and starts them from static/docs.js
    app = FastAPI(title="histoscreen", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Batch screening of breast histopathology for invasive ductal carcinoma. A screening aid, not a diagnosis.")
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, error: HTTPException):
        return problem(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_problem(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return problem(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(UploadError)
    async def upload_problem(request: Request, error: UploadError):
        return problem(error.status, str(error))

    api = APIRouter(prefix="/api")  # the token is checked by Guard, before any body is read

    def job_or_404(job_id: str):
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def finished_report(job_id: str) -> Path:
        job = job_or_404(job_id)
        if job.status != "done":
            raise HTTPException(409, f"job {job_id} is {job.status}; its results come when it is done")
        return store.folder(job_id) / "report"

    def slide_rows(job_id: str) -> list[dict]:
        return json.loads((finished_report(job_id) / "slides.json").read_text())["slides"]

    def slide_folder(job_id: str, slide: str) -> Path:
        report = finished_report(job_id)
        if slide not in {row["patient"] for row in slide_rows(job_id)}:
            raise HTTPException(404, f"job {job_id} has no slide {slide!r}")
        return child_path(report, "slides", slide)

    @api.get("/health")
    def health() -> JSONResponse:
        alive = sum(w.poll() is None for w in workers)
        expected = settings.workers if settings.start_workers else 0
        body = {"status": "ok" if alive == expected else "degraded", "version": __version__, "queued": store.count("queued"),
                "running": store.count("running"), "workers": alive, "workers_expected": expected, "worker_restarts": restarts["count"]}
        return JSONResponse(body, status_code=200 if alive == expected else 503)

    @api.post("/jobs", status_code=201, dependencies=[Depends(only_form_fields(SUBMIT_FIELDS))])
    def submit(file: UploadFile = File(...), name: str = Form(""), mpp: float | None = Form(None)) -> dict:
        try:
            check_pixel_size_setting("mpp", mpp)
        except SettingError as error:
            raise HTTPException(422, f"mpp {error.problem}") from None
        if store.count("queued") >= settings.max_queued:
            raise HTTPException(503, f"the queue holds {settings.max_queued} jobs already; try again later", headers={"Retry-After": "60"})
        job_id = store.new_id()
        folder = store.folder(job_id)
        (folder / "input").mkdir(parents=True)
        try:
            upload = folder / "upload.part"
            with open(upload, "wb") as sink:
                shutil.copyfileobj(file.file, sink, 1 << 20)
            with open(upload, "rb") as handle:
                kind = upload_kind(handle.read(8), file.filename or "")
            if kind == "patches":
                extract_patches(upload, folder / "input", max_uncompressed=settings.max_unzipped_bytes)
                upload.unlink()
            else:
                os.replace(upload, folder / "input" / slide_file_name(file.filename or "", name))
            store.add(job_id, name.strip()[:200] or slug(Path((file.filename or "upload").replace("\\", "/")).stem, "upload"), kind,
                      {"mpp": mpp} if mpp is not None else None)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": job_id, "status": "queued"}

    @api.get("/jobs")
    def list_jobs() -> list[dict]:
        return [job.public() for job in store.all()]

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return job_or_404(job_id).public()

    @api.get("/jobs/{job_id}/slides")
    def slides(job_id: str) -> list[dict]:
        reviews = store.reviews(job_id)
        return [{**row, **{f"review_{k}": v for k, v in reviews.get(row["patient"], {}).items()}} for row in slide_rows(job_id)]

    @api.get("/jobs/{job_id}/errors")
    def errors(job_id: str) -> list[dict]:
        """What was not screened, with paths as they are inside the upload (never the
        server's own folders); a failed job's reason when it got no report."""
        job = job_or_404(job_id)
        inside = str(store.folder(job_id) / "input") + os.sep
        if job.status == "failed":
            return [{"where": "", "problem": (job.error or "failed").replace(inside, "")}]
        with open(finished_report(job_id) / "errors.csv", newline="", encoding="utf-8") as handle:
            return [{"where": row["where"].replace(inside, ""), "problem": row["problem"].replace(inside, "")}
                    for row in csv.DictReader(handle)]

    @api.get("/jobs/{job_id}/slides.csv")
    def slides_csv(job_id: str) -> Response:
        rows = slides(job_id)
        buffer = io.StringIO()
        from histoscreen.report.screening import SLIDE_COLUMNS
        from histoscreen.tables import spreadsheet_safe

        header = SLIDE_COLUMNS + ["review_verdict", "review_note", "review_reviewed"]
        writer = csv.writer(buffer)
        writer.writerow(header)
        for row in rows:
            writer.writerow([spreadsheet_safe(row.get(column)) if row.get(column) is not None else "" for column in header])
        return Response(buffer.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="slides-{job_id}.csv"'})

    @api.get("/jobs/{job_id}/report.zip")
    def report_zip(job_id: str) -> StreamingResponse:
        report = finished_report(job_id)

        def chunks() -> Iterator[bytes]:
            # zipfile writes to a stream it cannot seek with data descriptors: each file's bytes
            # go out once, as written, and memory holds one file's compressed bytes at most
            sink = _Chunks()
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(report.rglob("*")):
                    if path.is_file():
                        archive.write(path, f"report/{path.relative_to(report)}")
                        yield sink.take()
            yield sink.take()

        return StreamingResponse(chunks(), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="report-{job_id}.zip"'})

    @api.get("/jobs/{job_id}/slides/{slide}/patches")
    def patches(job_id: str, slide: str) -> list[dict]:
        with open(slide_folder(job_id, slide) / "patches.csv", newline="") as handle:
            return [{"x": int(r["x"]), "y": int(r["y"]), "x_level0": float(r["x_level0"]), "y_level0": float(r["y_level0"]),
                     "prob_idc": float(r["prob_idc"]), "pred": int(r["pred"]),
                     "uncertain": int(r["uncertain"]), "label": int(r["label"]) if r["label"] else None}
                    for r in csv.DictReader(handle)]

    @api.get("/jobs/{job_id}/slides/{slide}/{kind}.geojson")
    def geojson(job_id: str, slide: str, kind: str) -> Response:
        if kind not in ("regions", "tiles"):
            raise HTTPException(404, f"no {kind}.geojson; there are regions.geojson and tiles.geojson")
        return Response((slide_folder(job_id, slide) / f"{kind}.geojson").read_bytes(), media_type="application/geo+json")

    @api.post("/jobs/{job_id}/slides/{slide}/review", status_code=201)
    def review(job_id: str, slide: str, body: Review) -> dict:
        slide_folder(job_id, slide)
        if body.verdict not in VERDICTS:
            raise HTTPException(422, f"verdict must be one of: {', '.join(VERDICTS)}")
        return store.review(job_id, slide, body.verdict, body.note)

    @api.get("/jobs/{job_id}/slides/{slide}/view")
    def view(job_id: str, slide: str) -> dict:
        folder = slide_folder(job_id, slide)
        row = next(r for r in slides(job_id) if r["patient"] == slide)
        gallery = sorted(p.name for p in (folder / "explained").glob("*.png"))
        payload = json.loads((folder / "view.json").read_text())
        return {**payload, "base": viewer_base(job_id, slide, payload), "slide": row, "explained": gallery}

    def slide_file(job_id: str, slide: str) -> Path | None:
        """The whole-slide image a slide was screened from, when the job's input is one."""
        from histoscreen.data.wsi import is_slide_file

        found = [p for p in (store.folder(job_id) / "input").iterdir() if p.stem == slide and p.is_file() and is_slide_file(p)]
        return found[0] if found else None

    def viewer_base(job_id: str, slide: str, view: dict) -> dict:
        """The picture the viewer shows and where the grid's cells lie on it: the slide file
        itself at level 0 (its pixels, as the GeoJSON's), or the report's mosaic."""
        level0 = view.get("level0")
        if level0 and slide_file(job_id, slide) is not None:
            scale = level0["per_grid_px"]
            return {"source": "slide", "size": level0["size"], "cell_px": GRID_STEP * scale,
                    "offset": [origin * scale for origin in view["origin"]]}
        return {"source": "mosaic", "size": view["mosaic"], "cell_px": view["cell_px"], "offset": [0, 0]}

    def pyramid(job_id: str, slide: str) -> DeepZoom | SlideDeepZoom:
        def make():
            path = slide_file(job_id, slide)
            return SlideDeepZoom(path) if path is not None else DeepZoom(slide_folder(job_id, slide) / "mosaic.jpg")

        return pyramids.get_or_make((job_id, slide), make)

    @api.get("/jobs/{job_id}/slides/{slide}/mosaic.dzi")
    def dzi(job_id: str, slide: str) -> Response:
        return Response(pyramid(job_id, slide).descriptor(), media_type="application/xml")

    @api.get("/jobs/{job_id}/slides/{slide}/mosaic_files/{level}/{tile}.jpeg")
    def dzi_tile(job_id: str, slide: str, level: int, tile: str) -> Response:
        try:
            column, row = (int(part) for part in tile.split("_"))
        except ValueError:
            raise HTTPException(404, f"no tile {tile!r}") from None
        data = pyramid(job_id, slide).tile(level, column, row)
        if data is None:
            raise HTTPException(404, f"no tile {level}/{tile}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/jobs/{job_id}/slides/{slide}/explained/{name}")
    def explained(job_id: str, slide: str, name: str) -> Response:
        path = slide_folder(job_id, slide) / "explained" / name
        if "/" in name or not name.endswith(".png") or not path.is_file():
            raise HTTPException(404, f"no explained patch {name!r}")
        return Response(path.read_bytes(), media_type="image/png")

    def patch_row(job_id: str, slide: str, x: int, y: int) -> dict:
        row = next((p for p in patches(job_id, slide) if p["x"] == x and p["y"] == y), None)
        if row is None:
            raise HTTPException(404, f"slide {slide!r} has no screened patch at x={x}, y={y}")
        return row

    def patch_pixels(job_id: str, slide: str, x: int, y: int) -> np.ndarray:
        from histoscreen.data.inputs import SlideReading, open_sources
        from histoscreen.models import load_metadata, shipped_model_path

        def opened():
            spacing = load_metadata(settings.model or shipped_model_path()).spacing_um_px
            reading = SlideReading(spacing, store.screening_options(job_id).get("mpp"))
            return open_sources([store.folder(job_id) / "input"], slides=reading, workers=1)

        for source in sources.get_or_make(job_id, opened):
            if slide in source.slide_ids():
                return source.read_cells(slide, np.array([x]), np.array([y]))[0]
        raise HTTPException(404, f"slide {slide!r} is no longer readable from the job's input")

    @api.get("/jobs/{job_id}/slides/{slide}/patch")
    def patch(job_id: str, slide: str, x: int, y: int) -> dict:
        return patch_row(job_id, slide, x, y)

    @api.get("/jobs/{job_id}/slides/{slide}/patch.png")
    def patch_png(job_id: str, slide: str, x: int, y: int) -> Response:
        patch_row(job_id, slide, x, y)
        return Response(png_bytes(patch_pixels(job_id, slide, x, y)), media_type="image/png")

    @api.get("/jobs/{job_id}/slides/{slide}/evidence.png")
    def evidence_png(job_id: str, slide: str, x: int, y: int) -> Response:
        from histoscreen.report.pictures import evidence_overlay
        from histoscreen.runtime import Predictor
        from histoscreen.tasks.explain import explanation_maps

        patch_row(job_id, slide, x, y)
        pixels = patch_pixels(job_id, slide, x, y)
        predictor = predictors.get_or_make("model", lambda: Predictor(settings.model))
        evidence = explanation_maps(predictor, pixels[None])[0]
        return Response(png_bytes(evidence_overlay(pixels, evidence)), media_type="image/png")

    # after patch.png and evidence.png, which this pattern would otherwise catch
    @api.get("/jobs/{job_id}/slides/{slide}/{picture}.png")
    def picture(job_id: str, slide: str, picture: str) -> Response:
        if picture not in ("overlay", "heatmap", "truth", "thumbnail"):
            raise HTTPException(404, f"no picture {picture!r}")
        path = slide_folder(job_id, slide) / f"{picture}.png"
        if not path.is_file():
            raise HTTPException(404, f"slide {slide!r} has no {picture}.png")
        return Response(path.read_bytes(), media_type="image/png")

    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_folder()), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs() -> str:
        return pages.api_docs()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return pages.home()

    def page_job_id(job_id: str) -> str:
        if not store.is_id(job_id):  # a page's address is data too: only ids this server makes
            raise HTTPException(404, f"no job {job_id!r}")
        return job_id

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(job_id: str) -> str:
        return pages.job(page_job_id(job_id))

    @app.get("/jobs/{job_id}/slides/{slide}", response_class=HTMLResponse, include_in_schema=False)
    def slide_page(job_id: str, slide: str) -> str:
        return pages.slide(page_job_id(job_id), slide)

    @app.exception_handler(HistoscreenError)
    async def histoscreen_problem(request: Request, error: HistoscreenError):
        return problem(422, str(error))

    return app
