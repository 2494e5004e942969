"""The web app's routes, one FastAPI router per concern: jobs (upload, list, errors,
downloads), slides (a finished job's table and patches), the viewer (Deep Zoom tiles,
pictures, a patch and its evidence), reviews, and the HTML pages. Every report file is read
through report.reader.ReportReader, the report's one reader; the routes only serve."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from histoscreen.constants import GRID_STEP, MAX_SLIDE_PX
from histoscreen.data.annotations import Annotation, label_cells
from histoscreen.data.wsi import check_pixel_size_setting
from histoscreen.errors import SettingError
from histoscreen.report.reader import PICTURES, ReportReader
from histoscreen.serving import pages
from histoscreen.serving.jobs import SHIPPED_VERSION, VERDICTS, Job, JobStore
from histoscreen.serving.uploads import extract_patches, slide_file_name, slug, upload_kind
from histoscreen.serving.viewer import DeepZoom, LeastRecentlyUsed, SlideDeepZoom, png_bytes
from histoscreen.tables import csv_text

SUBMIT_FIELDS = frozenset({"file", "name", "mpp"})
REVIEW_COLUMNS = ["review_verdict", "review_note", "review_reviewed"]


class Review(BaseModel):
    verdict: str = Field(description=f"one of: {', '.join(VERDICTS)}")
    note: str = Field(default="", max_length=4000)


class TileMark(BaseModel):
    x: int
    y: int
    label: int | None = Field(description="1 IDC, 0 not IDC, null to clear the mark")


class TileMarks(BaseModel):
    marks: list[TileMark] = Field(max_length=100_000)


class RegionMark(BaseModel):
    polygon: list[tuple[float, float]] = Field(min_length=3, max_length=10_000, description=(
        "the region's corners in the slide's grid pixels (50 a tile; the x and y of the patch names less 1), as the viewer gives them"))
    label: int | None = Field(description="1 IDC, 0 not IDC, null to clear the marks of the tiles inside")


class AdaptRequest(BaseModel):
    jobs: list[str] | None = Field(default=None, max_length=1000,
                                   description="finished screening jobs whose labels calibrate (default: all of them)")
    name: str = Field(default="", max_length=200)


@dataclass
class Served:
    """What the routes share: the job store, the server's settings and its small caches."""

    store: JobStore
    model: str | None
    max_queued: int
    max_unzipped_bytes: int
    pyramids: LeastRecentlyUsed = field(default_factory=lambda: LeastRecentlyUsed(4))
    sources: LeastRecentlyUsed = field(default_factory=lambda: LeastRecentlyUsed(2))
    predictors: LeastRecentlyUsed = field(default_factory=lambda: LeastRecentlyUsed(1))

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def report(self, job_id: str) -> ReportReader:
        job = self.job(job_id)
        if job.kind == "adapt":
            raise HTTPException(409, f"job {job_id} built a model version, not a report: see GET /api/models")
        if job.status != "done":
            raise HTTPException(409, f"job {job_id} is {job.status}; its results come when it is done")
        return ReportReader(self.store.folder(job_id) / "report")

    def slide_report(self, job_id: str, slide: str) -> ReportReader:
        """The job's report, once it is known to hold `slide`."""
        report = self.report(job_id)
        if not report.has_slide(slide):
            raise HTTPException(404, f"job {job_id} has no slide {slide!r}")
        return report

    def inside_upload(self, job_id: str, text: str) -> str:
        """A path as it is inside the upload, never the server's own folders."""
        return text.replace(str(self.store.folder(job_id) / "input") + os.sep, "")

    def reviewed_rows(self, job_id: str) -> list[dict]:
        reviews = self.store.reviews(job_id)
        return [{**row, **{f"review_{k}": v for k, v in reviews.get(row["patient"], {}).items()}} for row in self.report(job_id).rows]


def check_label(label: int | None) -> None:
    """A reviewer's label: 1 IDC, 0 not IDC, None to clear a mark."""
    if label not in (0, 1, None):
        raise HTTPException(422, f"label must be 1 (IDC), 0 (not IDC) or null, got {label}")


def only_form_fields(known: frozenset[str]):
    """A dependency refusing a form with fields the endpoint does not read: one it ignored
    (slide_mpp for mpp, say) would screen with settings nobody asked for, without a word."""

    async def check(request: Request) -> None:
        unknown = sorted(set((await request.form()).keys()) - known)  # the form FastAPI parsed already
        if unknown:
            raise HTTPException(422, f"unknown form field {unknown[0]!r}; this endpoint takes {', '.join(sorted(known))}")

    return check


class _Chunks(io.RawIOBase):
    """A write-only stream whose bytes are taken out as they come (for a streamed zip)."""

    def __init__(self):
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def jobs_router(served: Served) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["jobs"])
    store = served.store

    @router.post("/jobs", status_code=201, dependencies=[Depends(only_form_fields(SUBMIT_FIELDS))])
    def submit(file: UploadFile = File(...), name: str = Form(""), mpp: float | None = Form(None)) -> dict:
        try:
            check_pixel_size_setting("mpp", mpp)
        except SettingError as error:
            raise HTTPException(422, f"mpp {error.problem}") from None
        if store.count("queued") >= served.max_queued:
            raise HTTPException(503, f"the queue holds {served.max_queued} jobs already; try again later", headers={"Retry-After": "60"})
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
                extract_patches(upload, folder / "input", max_uncompressed=served.max_unzipped_bytes)
                upload.unlink()
            else:
                os.replace(upload, folder / "input" / slide_file_name(file.filename or "", name))
            store.add(job_id, name.strip()[:200] or slug(Path((file.filename or "upload").replace("\\", "/")).stem, "upload"), kind,
                      {"mpp": mpp} if mpp is not None else None)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": job_id, "status": "queued"}

    @router.get("/jobs")
    def list_jobs() -> list[dict]:
        return [job.public() for job in store.all()]

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return {**served.job(job_id).public(), "model": store.job_model(job_id)}

    @router.get("/jobs/{job_id}/errors")
    def errors(job_id: str) -> list[dict]:
        """What was not screened, with paths as they are inside the upload (never the
        server's own folders); a failed job's reason when it got no report."""
        job = served.job(job_id)
        if job.status == "failed":
            return [{"where": "", "problem": served.inside_upload(job_id, job.error or "failed")}]
        return [{"where": served.inside_upload(job_id, p.where), "problem": served.inside_upload(job_id, p.reason)}
                for p in served.report(job_id).errors()]

    @router.get("/jobs/{job_id}/report.zip")
    def report_zip(job_id: str) -> StreamingResponse:
        report = served.report(job_id).folder

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

    return router


def slides_router(served: Served) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["slides"])

    @router.get("/jobs/{job_id}/slides")
    def slides(job_id: str) -> list[dict]:
        return served.reviewed_rows(job_id)

    @router.get("/jobs/{job_id}/slides.csv")
    def slides_csv(job_id: str) -> Response:
        from histoscreen.report.screening import SLIDE_COLUMNS

        header = SLIDE_COLUMNS + REVIEW_COLUMNS
        rows = ([row.get(column) if row.get(column) is not None else "" for column in header] for row in served.reviewed_rows(job_id))
        return Response(csv_text(header, rows), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="slides-{job_id}.csv"'})

    @router.get("/jobs/{job_id}/slides/{slide}/patches")
    def patches(job_id: str, slide: str) -> list[dict]:
        return served.slide_report(job_id, slide).patches(slide)

    @router.get("/jobs/{job_id}/slides/{slide}/{kind}.geojson")
    def geojson(job_id: str, slide: str, kind: str) -> Response:
        if kind not in ("regions", "tiles"):
            raise HTTPException(404, f"no {kind}.geojson; there are regions.geojson and tiles.geojson")
        return Response(served.slide_report(job_id, slide).slide_file(slide, f"{kind}.geojson").read_bytes(),
                        media_type="application/geo+json")

    return router


def reviews_router(served: Served) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["reviews"])

    @router.post("/jobs/{job_id}/slides/{slide}/review", status_code=201)
    def review(job_id: str, slide: str, body: Review) -> dict:
        served.slide_report(job_id, slide)
        if body.verdict not in VERDICTS:
            raise HTTPException(422, f"verdict must be one of: {', '.join(VERDICTS)}")
        return served.store.review(job_id, slide, body.verdict, body.note)

    @router.put("/jobs/{job_id}/slides/{slide}/tiles")
    def mark_tiles(job_id: str, slide: str, body: TileMarks) -> dict:
        """A reviewer's labels of screened tiles (IDC or not), stored with the job: the lab's
        ground truth, for `calibrate --labels` (labels.csv)."""
        screened = {(p["x"], p["y"]) for p in served.slide_report(job_id, slide).patches(slide)}
        for mark in body.marks:
            if (mark.x, mark.y) not in screened:
                raise HTTPException(422, f"slide {slide!r} has no screened tile at x={mark.x}, y={mark.y}")
            check_label(mark.label)
        return {"marked": served.store.mark_tiles(job_id, slide, [(m.x, m.y, m.label) for m in body.marks])}

    @router.put("/jobs/{job_id}/slides/{slide}/region")
    def mark_region(job_id: str, slide: str, body: RegionMark) -> dict:
        """Label every screened tile at least half inside a drawn region (the rule QuPath
        annotations are read by, data/annotations.py); returns the tiles marked."""
        check_label(body.label)
        ring = np.asarray(body.polygon, dtype=np.float64)
        if not np.isfinite(ring).all() or np.abs(ring).max() > MAX_SLIDE_PX:
            raise HTTPException(422, f"the region's corners must be finite grid pixels within +/-{MAX_SLIDE_PX:,}")
        patches = served.slide_report(job_id, slide).patches(slide)
        xs, ys = np.array([p["x"] for p in patches]), np.array([p["y"] for p in patches])
        inside = label_cells([Annotation(1, [[ring]])], xs, ys, level0_per_grid_px=1.0,
                             level0_size=(int(xs.max()) + GRID_STEP, int(ys.max()) + GRID_STEP), where=f"the region on slide {slide}") == 1
        if not inside.any():
            raise HTTPException(422, "the region covers no screened tile (at least half of a tile must lie inside it)")
        tiles = [(int(x), int(y)) for x, y in zip(xs[inside], ys[inside])]
        served.store.mark_tiles(job_id, slide, [(x, y, body.label) for x, y in tiles])
        return {"marked": len(tiles), "label": body.label, "tiles": [{"x": x, "y": y} for x, y in tiles]}

    @router.get("/jobs/{job_id}/slides/{slide}/tiles")
    def tile_marks(job_id: str, slide: str) -> list[dict]:
        served.slide_report(job_id, slide)
        return served.store.tile_marks(job_id, slide)

    @router.get("/jobs/{job_id}/labels.csv")
    def labels_csv(job_id: str) -> Response:
        """Every tile a reviewer labelled in this job, as `screen` and `calibrate --labels` read them."""
        served.report(job_id)
        rows = ([m["slide"], m["x"], m["y"], m["label"]] for m in served.store.tile_marks(job_id))
        return Response(csv_text(["patient", "x", "y", "label"], rows), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="labels-{job_id}.csv"'})

    return router


def viewer_router(served: Served) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["viewer"])
    store = served.store

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
        def make():  # once per slide: a tile request must not parse the report again
            report = served.slide_report(job_id, slide)
            path = slide_file(job_id, slide)
            return SlideDeepZoom(path) if path is not None else DeepZoom(report.slide_file(slide, "mosaic.jpg"))

        return served.pyramids.get_or_make((job_id, slide), make)

    def patch_row(job_id: str, slide: str, x: int, y: int) -> dict:
        row = next((p for p in served.slide_report(job_id, slide).patches(slide) if p["x"] == x and p["y"] == y), None)
        if row is None:
            raise HTTPException(404, f"slide {slide!r} has no screened patch at x={x}, y={y}")
        return row

    def patch_pixels(job_id: str, slide: str, x: int, y: int) -> np.ndarray:
        from histoscreen.data.inputs import SlideReading, open_sources
        from histoscreen.models import load_metadata, shipped_model_path

        def opened():
            spacing = load_metadata(served.model or shipped_model_path()).spacing_um_px
            reading = SlideReading(spacing, store.screening_options(job_id).get("mpp"))
            return open_sources([store.folder(job_id) / "input"], slides=reading, workers=1)

        for source in served.sources.get_or_make(job_id, opened):
            if slide in source.slide_ids():
                return source.read_cells(slide, np.array([x]), np.array([y]))[0]
        raise HTTPException(404, f"slide {slide!r} is no longer readable from the job's input")

    @router.get("/jobs/{job_id}/slides/{slide}/view")
    def view(job_id: str, slide: str) -> dict:
        report = served.slide_report(job_id, slide)
        payload = report.view(slide)
        row = next(r for r in served.reviewed_rows(job_id) if r["patient"] == slide)
        return {**payload, "base": viewer_base(job_id, slide, payload), "slide": row, "explained": report.explained(slide)}

    @router.get("/jobs/{job_id}/slides/{slide}/mosaic.dzi")
    def dzi(job_id: str, slide: str) -> Response:
        return Response(pyramid(job_id, slide).descriptor(), media_type="application/xml")

    @router.get("/jobs/{job_id}/slides/{slide}/mosaic_files/{level}/{tile}.jpeg")
    def dzi_tile(job_id: str, slide: str, level: int, tile: str) -> Response:
        try:
            column, row = (int(part) for part in tile.split("_"))
        except ValueError:
            raise HTTPException(404, f"no tile {tile!r}") from None
        data = pyramid(job_id, slide).tile(level, column, row)
        if data is None:
            raise HTTPException(404, f"no tile {level}/{tile}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/jobs/{job_id}/slides/{slide}/explained/{name}")
    def explained(job_id: str, slide: str, name: str) -> Response:
        report = served.slide_report(job_id, slide)
        if name not in report.explained(slide):
            raise HTTPException(404, f"no explained patch {name!r}")
        return Response(report.slide_file(slide, "explained", name).read_bytes(), media_type="image/png")

    @router.get("/jobs/{job_id}/slides/{slide}/patch")
    def patch(job_id: str, slide: str, x: int, y: int) -> dict:
        return patch_row(job_id, slide, x, y)

    @router.get("/jobs/{job_id}/slides/{slide}/patch.png")
    def patch_png(job_id: str, slide: str, x: int, y: int) -> Response:
        patch_row(job_id, slide, x, y)
        return Response(png_bytes(patch_pixels(job_id, slide, x, y)), media_type="image/png")

    @router.get("/jobs/{job_id}/slides/{slide}/evidence.png")
    def evidence_png(job_id: str, slide: str, x: int, y: int) -> Response:
        from histoscreen.report.pictures import evidence_overlay
        from histoscreen.runtime import Predictor
        from histoscreen.tasks.explain import explanation_maps

        patch_row(job_id, slide, x, y)
        pixels = patch_pixels(job_id, slide, x, y)
        predictor = served.predictors.get_or_make("model", lambda: Predictor(served.model))
        evidence = explanation_maps(predictor, pixels[None])[0]
        return Response(png_bytes(evidence_overlay(pixels, evidence)), media_type="image/png")

    # after patch.png and evidence.png, which this pattern would otherwise catch
    @router.get("/jobs/{job_id}/slides/{slide}/{picture}.png")
    def picture(job_id: str, slide: str, picture: str) -> Response:
        if picture not in PICTURES:
            raise HTTPException(404, f"no picture {picture!r}")
        path = served.slide_report(job_id, slide).picture(slide, picture)
        if path is None:
            raise HTTPException(404, f"slide {slide!r} has no {picture}.png")
        return Response(path.read_bytes(), media_type="image/png")

    return router


def models_router(served: Served) -> APIRouter:
    """Model versions: calibrated from the labels of reviewed jobs (an adapt job, run by a
    worker), each with its before/after estimate; one is active and scores new jobs. The
    server's own model is the version "shipped" and is never changed."""
    from histoscreen.models.bundle import model_digests

    router = APIRouter(prefix="/api", tags=["model versions"])
    store = served.store

    @router.get("/models")
    def versions() -> dict:
        name, base = store.version_model(SHIPPED_VERSION, served.model)
        digests = model_digests(base)
        shipped = {"id": SHIPPED_VERSION, "name": name, "created": None, "based_on": None, "jobs": [],
                   "weights_sha256": digests["weights"], "scoring_sha256": digests["scoring"], "estimate": None}
        active = store.active_version()
        return {"active": active, "versions": [{**v, "active": v["id"] == active} for v in [shipped, *store.versions()]]}

    @router.post("/models", status_code=202)
    def adapt(body: AdaptRequest) -> dict:
        """Queue an adapt job: calibrate the active version on the jobs' labels (tile marks
        first, labels in patch names elsewhere); the new version is not made active."""
        chosen = body.jobs if body.jobs is not None else [job.id for job in store.all() if job.kind != "adapt" and job.status == "done"]
        for job_id in chosen:
            job = served.job(job_id)
            if job.kind == "adapt" or job.status != "done":
                raise HTTPException(409, f"job {job_id} is {'an adapt job' if job.kind == 'adapt' else job.status}; "
                                    "a model is adapted on finished screening jobs")
        if not chosen:
            raise HTTPException(409, "no finished screening job to adapt on: screen and review some slides first")
        if store.count("queued") >= served.max_queued:
            raise HTTPException(503, f"the queue holds {served.max_queued} jobs already; try again later", headers={"Retry-After": "60"})
        job_id = store.new_id()
        store.folder(job_id).mkdir(parents=True)
        name = body.name.strip() or f"calibrated on {len(chosen)} job{'s' if len(chosen) != 1 else ''}"
        store.add(job_id, name, "adapt", {"jobs": list(dict.fromkeys(chosen)), "based_on": store.active_version()})
        return {"id": job_id, "status": "queued"}

    @router.post("/models/{version}/activate")
    def activate(version: str) -> dict:
        if version != SHIPPED_VERSION and not store.has_version(version):
            raise HTTPException(404, f"no model version {version!r}")
        store.activate(version)
        return {"active": version}

    return router


def pages_router(served: Served) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/docs", response_class=HTMLResponse)
    def api_docs() -> str:
        return pages.api_docs()

    @router.get("/", response_class=HTMLResponse)
    def home() -> str:
        return pages.home()

    def page_job_id(job_id: str) -> str:
        if not served.store.is_id(job_id):  # a page's address is data too: only ids this server makes
            raise HTTPException(404, f"no job {job_id!r}")
        return job_id

    @router.get("/models", response_class=HTMLResponse)
    def models_page() -> str:
        return pages.models()

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: str) -> str:
        return pages.job(page_job_id(job_id))

    @router.get("/jobs/{job_id}/slides/{slide}", response_class=HTMLResponse)
    def slide_page(job_id: str, slide: str) -> str:
        return pages.slide(page_job_id(job_id), slide)

    return router
