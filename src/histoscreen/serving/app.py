"""`histoscreen serve`: a small, local-first web service over the same screening task.

FastAPI for the API and the pages, SQLite for jobs and reviews, files for uploads and
reports, and screening worker processes that take queued jobs one at a time. Errors are
RFC 9457 problem details (application/problem+json). With a token, every /api call needs
`Authorization: Bearer TOKEN`, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from histoscreen import __version__
from histoscreen.checks import whole_number
from histoscreen.errors import HistoscreenError, SettingError
from histoscreen.serving.jobs import JobStore
from histoscreen.serving.uploads import UploadError
from histoscreen.serving.routers import (
    Served, jobs_router, models_router, pages_router, reviews_router, slides_router, viewer_router,
)

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
        whole_number("parallel_jobs", self.workers)
        whole_number("max_queued", self.max_queued)
        for name, size in (("max_upload_mb", self.max_upload_bytes), ("max_unzipped_mb", self.max_unzipped_bytes)):
            whole_number(name, whole_number(name, size) >> 20)


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


def create_app(settings: ServeSettings) -> FastAPI:
    store = JobStore(settings.data)
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

    served = Served(store, settings.model, settings.max_queued, settings.max_unzipped_bytes)
    api = APIRouter(prefix="/api", tags=["server"])  # the token is checked by Guard, before any body is read

    @api.get("/health")
    def health() -> JSONResponse:
        alive = sum(w.poll() is None for w in workers)
        expected = settings.workers if settings.start_workers else 0
        body = {"status": "ok" if alive == expected else "degraded", "version": __version__, "queued": store.count("queued"),
                "running": store.count("running"), "workers": alive, "workers_expected": expected, "worker_restarts": restarts["count"]}
        return JSONResponse(body, status_code=200 if alive == expected else 503)

    for router in (api, jobs_router(served), slides_router(served), reviews_router(served), viewer_router(served), models_router(served)):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_folder()), name="docs-assets")
    app.include_router(pages_router(served))

    @app.exception_handler(HistoscreenError)
    async def histoscreen_problem(request: Request, error: HistoscreenError):
        return problem(422, str(error))

    return app
