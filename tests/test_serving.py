"""`histoscreen serve`: the REST API on a real app with real worker processes, hostile
uploads, a restart while a job runs, and the pages in a real headless browser."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from histoscreen.data import synthesize  # noqa: E402
from histoscreen.models.bundle import model_digests  # noqa: E402
from histoscreen.serving.app import ServeSettings, create_app  # noqa: E402
from conftest import screen_to, wait_done  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def zip_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "slides"
    synthesize(folder, patients=3, seed=17, first_index=60, idc_fractions=[0.3, 0.0, 0.1])
    return folder


def test_the_whole_flow_gives_what_the_command_line_gives(slides, tiny_model, tmp_path):
    data_folder = tmp_path / "data"
    settings = ServeSettings(data=data_folder, model=str(tiny_model))
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        submitted = client.post("/api/jobs", files={"file": ("batch.zip", zip_of(slides), "application/zip")}, data={"name": "batch 1"})
        assert submitted.status_code == 201 and submitted.json()["status"] == "queued"
        job_id = submitted.json()["id"]
        job = wait_done(client, job_id)
        assert job["status"] == "done" and job["progress"] == 1.0 and job["error"] is None and job["name"] == "batch 1"
        assert set(job) == {"id", "name", "kind", "status", "progress", "error", "created", "finished", "model"}
        assert job["model"]["version"] == "shipped" and job["model"]["weights_sha256"] == model_digests(tiny_model)["weights"]
        assert [j["id"] for j in client.get("/api/jobs").json()] == [job_id]
        served = client.get(f"/api/jobs/{job_id}/slides").json()

        screen_to(slides, tmp_path / "cli-report", model=tiny_model)
        with open(tmp_path / "cli-report" / "slides.csv", newline="") as handle:
            expected = list(csv.DictReader(handle))
        assert [r["patient"] for r in served] == [r["patient"] for r in expected]
        for got, want in zip(served, expected):
            for column, value in want.items():
                assert ("" if got[column] is None else str(got[column])) == value, column

        slide = served[0]["patient"]
        patches = client.get(f"/api/jobs/{job_id}/slides/{slide}/patches").json()
        assert len(patches) == served[0]["patches"] and set(patches[0]) == {"x", "y", "x_level0", "y_level0", "prob_idc", "pred", "uncertain", "label"}
        assert all(p["x_level0"] == p["x"] - 1 and p["y_level0"] == p["y"] - 1 for p in patches)  # patches: level 0 is the grid
        regions = client.get(f"/api/jobs/{job_id}/slides/{slide}/regions.geojson")
        assert regions.headers["content-type"] == "application/geo+json" and regions.json()["type"] == "FeatureCollection"
        download = client.get(f"/api/jobs/{job_id}/report.zip").content
        report = zipfile.ZipFile(io.BytesIO(download))
        assert report.testzip() is None
        folder = data_folder / "jobs" / job_id / "report"
        on_disk = {f"report/{p.relative_to(folder)}": p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert sorted(report.namelist()) == sorted(on_disk) and all(report.read(name) == on_disk[name] for name in on_disk)
        assert len(download) <= 1.05 * sum(len(b) for b in on_disk.values())  # streamed once, not grown

        broken = sorted(slides.rglob("*.png"))[0].relative_to(slides)
        damaged = io.BytesIO()
        with zipfile.ZipFile(damaged, "w") as archive:
            archive.writestr(str(broken), b"\x89PNG\r\n\x1a\n" + b"cut short")
            for path in sorted(slides.rglob("*.png"))[1:40]:
                archive.write(path, path.relative_to(slides))
        second = client.post("/api/jobs", files={"file": ("damaged.zip", damaged.getvalue(), "application/zip")}).json()["id"]
        assert wait_done(client, second)["status"] == "done"
        problems = client.get(f"/api/jobs/{second}/errors").json()
        assert [p["where"] for p in problems] == [str(broken)], problems  # the path inside the upload, not the server's
        assert str(data_folder) not in json.dumps(problems)

        saved = client.post(f"/api/jobs/{job_id}/slides/{slide}/review", json={"verdict": "needs second look", "note": "=cmd nests"})
        assert saved.status_code == 201 and saved.json()["verdict"] == "needs second look"
        assert client.post(f"/api/jobs/{job_id}/slides/{slide}/review", json={"verdict": "maybe"}).status_code == 422
        rows = list(csv.DictReader(io.StringIO(client.get(f"/api/jobs/{job_id}/slides.csv").text)))
        mine = next(r for r in rows if r["patient"] == slide)
        assert mine["review_verdict"] == "needs second look" and mine["review_note"] == "'=cmd nests" and mine["review_reviewed"]

        missing = client.get(f"/api/jobs/{job_id}/slides/../../etc/patches")
        assert missing.status_code == 404
        unknown = client.get(f"/api/jobs/{job_id}/slides/nope/patches")
        assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
        assert unknown.json()["detail"] == f"job {job_id} has no slide 'nope'"
        assert client.get("/docs").status_code == 200 and "/api/jobs" in client.get("/openapi.json").json()["paths"]


def test_every_api_call_needs_the_token_when_one_is_set(tmp_path):
    settings = ServeSettings(data=tmp_path / "data", token="s3cret-token-42", start_workers=False)
    app = create_app(settings)
    routes = [(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations]
    assert len(routes) >= 15 and all(path.startswith("/api/") for _, path in routes)  # every API route, from the app itself
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for method, template in routes:
            path = template.replace("{job_id}", "0000000000000-000000000000").replace("{slide}", "s").replace("{kind}", "regions")
            path = path.replace("{level}", "1").replace("{tile}", "0_0").replace("{name}", "a.png").replace("{picture}", "heatmap")
            refused = client.request(method, path)
            assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json", (method, path)
            assert refused.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, headers={"Authorization": "Bearer s3cre"})
            assert wrong.status_code == 401, (method, path)
        assert client.get("/api/health", headers={"Authorization": "Bearer s3cret-token-42"}).json()["status"] == "ok"
        assert client.get("/").status_code == 200  # the page shell holds no data; its API calls need the token


@contextmanager
def served(settings: ServeSettings):
    """The app on a real uvicorn server on loopback, in this process (no workers)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def streamed_post(port: int, path: str, headers: dict, megabytes: int, start: bytes = b"") -> tuple[int, int]:
    """POST a chunked body of up to `megabytes` MiB over a raw socket, sending until the server
    answers: (status, MiB sent before the answer came)."""
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"127.0.0.1:{port}", "Transfer-Encoding": "chunked", **headers}.items())
        connection.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + (b"%x\r\n%s\r\n" % (len(start), start) if start else b""))
        chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
        sent = 0
        while sent < megabytes and not select.select([connection], [], [], 0.05)[0]:
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        answer = connection.recv(4096).decode("latin-1")
    return int(answer.split(" ", 2)[1]), sent


def test_the_guard_answers_before_any_body_is_read(tmp_path):
    data = tmp_path / "data"
    settings = ServeSettings(data=data, token="s3cret-token-42", start_workers=False, max_upload_bytes=1 << 20)
    auth = {"Authorization": "Bearer s3cret-token-42"}
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}

    def written() -> list[str]:
        return sorted(str(p.relative_to(data)) for p in data.rglob("*") if "sqlite" not in p.name)

    with served(settings) as port:
        before = written()
        status, sent = streamed_post(port, "/api/jobs", multipart, 64)
        assert status == 401 and sent <= 2, (status, sent)  # no token: answered before the body
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\nContent-Type: application/zip\r\n\r\n'
        status, sent = streamed_post(port, "/api/jobs", {**auth, **multipart}, 64, part)
        assert status == 413 and sent <= 4, (status, sent)  # answered as soon as it passed 1 MiB
        status, sent = streamed_post(port, "/api/jobs/0000000000000-000000000000/slides/s/review",
                                     {**auth, "Content-Type": "application/json"}, 64, b'{"verdict": "agree", "note": "')
        assert status == 413 and sent <= 4, (status, sent)  # JSON is capped too
        assert written() == before

    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        declared = client.post("/api/jobs", headers={**auth, **multipart}, content=b"x" * (2 << 20))
        assert declared.status_code == 413 and "1,048,576" in declared.json()["detail"]
        rebinding = client.get("/api/jobs", headers={**auth, "Host": "evil.example:8000"})
        assert rebinding.status_code == 421 and "evil.example" in rebinding.json()["detail"]
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 421
        assert client.get("/api/health", headers={**auth, "Host": "localhost:8000"}).status_code == 200
        cross_site = client.post("/api/jobs", headers={**auth, "Origin": "http://evil.example"}, files={"file": ("a.zip", b"PK")})
        assert cross_site.status_code == 403 and client.get("/api/jobs", headers=auth).json() == []
        same_site = client.post("/api/jobs", headers={**auth, "Origin": "http://127.0.0.1:8000"}, files={"file": ("a.zip", b"x")})
        assert same_site.status_code == 415  # past the guard, refused for what it is
        for path in ("/", "/api/health", "/static/app.js", "/jobs/0000000000000-000000000000", "/nope"):
            policy = client.get(path, headers=auth).headers
            assert "script-src 'self';" in policy["content-security-policy"] and "frame-ancestors 'none'" in policy["content-security-policy"], path
            assert policy["x-content-type-options"] == "nosniff", path
        assert client.get('/jobs/x"><img src=x onerror=alert(1)>').status_code == 404
    assert written() == before


def symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("900000/0/900000_idx5_x1_y1_class0.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def zip_with(name: str, data: bytes = b"x", compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        member = zipfile.ZipInfo(name)
        member.compress_type = compression
        archive.writestr(member, data)
    return buffer.getvalue()


def zip_of_members(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


PATCH = "900000/0/900000_idx5_x1_y1_class0.png"


def encrypted_zip() -> bytes:
    data = bytearray(zip_with(PATCH, b"x" * 100))
    for header, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the general-purpose flag, bit 0: encrypted
        where = data.find(header) + flags_at
        data[where] |= 1
    return bytes(data)


def method_99_zip() -> bytes:  # AES, as WinZip writes it: a method zipfile cannot read
    data = bytearray(zip_with(PATCH, b"x" * 100))
    for header, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        where = data.find(header) + method_at
        data[where : where + 2] = (99).to_bytes(2, "little")
    return bytes(data)


def bad_crc_zip() -> bytes:
    data = bytearray(zip_with(PATCH, b"x" * 100))
    data[data.find(b"x" * 100) + 50] = ord("y")  # the stored bytes no longer match their CRC
    return bytes(data)


def under_declared_zip() -> bytes:
    """A member of 8 MiB that declares 100 bytes: a bomb that lies about its size."""
    data = bytearray(zip_with(PATCH, bytes(8 << 20), zipfile.ZIP_DEFLATED))
    for header, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        where = data.find(header) + size_at
        data[where : where + 4] = (100).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize(
    "name, payload, status, words",
    [
        ("slip.zip", zip_with("../../escaped.png"), 400, "'..'"),
        ("liar.zip", under_declared_zip(), 400, "cannot be read"),  # zipfile stops at the declared size; the CRC then fails
        ("clash.zip", zip_of_members(("900000/0", b"x"), (PATCH, b"x")), 400, "both a file and a folder"),
        ("twice.zip", zip_of_members((PATCH, b"x"), (PATCH, b"y")), 400, "given twice"),
        ("encrypted.zip", encrypted_zip(), 400, "encryption"),
        ("method99.zip", method_99_zip(), 400, "compression method 99"),
        ("crc.zip", bad_crc_zip(), 400, "cannot be read"),
        ("long.zip", zip_with("900000/0/" + "a" * 300 + ".png"), 400, "longer than 255 bytes"),
        ("deep.zip", zip_with("a/" * 5000 + "x.png"), 400, "folders deep"),
        ("absolute.zip", zip_with("/tmp/escaped.png"), 400, "absolute path"),
        ("drive.zip", zip_with("C:/escaped.png"), 400, "absolute path"),
        ("backslash.zip", zip_with("..\\escaped.png"), 400, "backslash"),
        ("link.zip", symlink_zip(), 400, "symbolic link"),
        ("bomb.zip", zip_with("900000/0/900000_idx5_x1_y1_class0.png", bytes(30 << 20), zipfile.ZIP_DEFLATED), 413, "expands to"),
        ("big.zip", b"PK\x03\x04" + bytes(3 << 20), 413, "bytes; at most"),
        ("notes.zip", b"just text, not a zip", 415, "neither a zip"),
        ("broken.zip", b"PK\x03\x04 truncated", 400, "not a readable zip"),
        ("texts.zip", zip_with("readme.txt", b"hello"), 422, "no .png patches"),
        ("misnamed.zip", zip_of_members((PATCH, b"x"), ("slide-1/tile 3.png", b"x")), 422, "'slide-1/tile 3.png' is not named"),
    ],
)
def test_hostile_uploads_are_refused_and_write_nothing(tmp_path, name, payload, status, words):
    data = tmp_path / "data"
    settings = ServeSettings(data=data, start_workers=False, max_upload_bytes=2 << 20, max_unzipped_bytes=10 << 20)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        before = sorted(p.relative_to(data) for p in data.rglob("*"))
        refused = client.post("/api/jobs", files={"file": (name, payload, "application/octet-stream")})
        assert refused.status_code == status, refused.text
        assert refused.headers["content-type"] == "application/problem+json" and words in refused.json()["detail"]
        assert client.get("/api/jobs").json() == []
        assert sorted(p.relative_to(data) for p in data.rglob("*") if "sqlite" not in p.name) == [p for p in before if "sqlite" not in p.name]
    assert not list(tmp_path.glob("escaped*")) and not Path("/tmp/escaped.png").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(data: Path, port: int, model: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "histoscreen.cli", "serve", "--data", str(data), "--port", str(port), "--model", str(model), "-q"]
    server = subprocess.Popen(command, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError("the server did not start")


def test_a_restart_loses_nothing_and_the_running_job_ends_well(slides, tiny_model, tmp_path):
    import httpx

    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(data, port, tiny_model)
    try:
        first = httpx.post(f"{url}/api/jobs", files={"file": ("a.zip", zip_of(slides))}).json()["id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/api/jobs/{first}").json()["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.2)
        finished_slides = httpx.get(f"{url}/api/jobs/{first}/slides").json()
        second = httpx.post(f"{url}/api/jobs", files={"file": ("b.zip", zip_of(slides))}).json()["id"]
        while httpx.get(f"{url}/api/jobs/{second}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its worker, mid-job
        server.wait()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    server = start_server(data, port, tiny_model)
    try:
        assert httpx.get(f"{url}/api/jobs/{first}").json()["status"] == "done"
        assert httpx.get(f"{url}/api/jobs/{first}/slides").json() == finished_slides
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{url}/api/jobs/{second}").json())["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["status"] == "done", job  # queued again after the restart, then screened
        assert [s["patient"] for s in httpx.get(f"{url}/api/jobs/{second}/slides").json()] == [s["patient"] for s in finished_slides]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# where a slide's first screened patch lies on screen: its cell's centre, through the viewer's own mapping
FIRST_PATCH_ON_SCREEN = """async () => {
    const { job, slide } = document.body.dataset;
    const base = `/api/jobs/${job}/slides/${slide}`;
    const view = await (await fetch(`${base}/view`)).json();
    const patch = (await (await fetch(`${base}/patches`)).json())[0];
    const column = (patch.x - 1 - view.origin[0]) / 50, row = (patch.y - 1 - view.origin[1]) / 50;
    const image = new OpenSeadragon.Point(view.base.offset[0] + (column + 0.5) * view.base.cell_px,
                                          view.base.offset[1] + (row + 0.5) * view.base.cell_px);
    const on = window.histoscreenViewer.world.getItemAt(0).imageToViewerElementCoordinates(image);
    return [on.x, on.y];
}"""


GRID_POINT_ON_SCREEN = """async ([gx, gy]) => {
    const { job, slide } = document.body.dataset;
    const view = await (await fetch(`/api/jobs/${job}/slides/${slide}/view`)).json();
    const image = new OpenSeadragon.Point(view.base.offset[0] + (gx - view.origin[0]) / 50 * view.base.cell_px,
                                          view.base.offset[1] + (gy - view.origin[1]) / 50 * view.base.cell_px);
    const on = window.histoscreenViewer.world.getItemAt(0).imageToViewerElementCoordinates(image);
    return [on.x, on.y];
}"""


def click_grid_point(page, gx: float, gy: float) -> None:
    """Click the viewer where the slide's grid pixel (gx, gy) is shown (50 grid px a tile)."""
    box = page.locator("#viewer").bounding_box()
    point = page.evaluate(GRID_POINT_ON_SCREEN, [gx, gy])
    page.mouse.click(box["x"] + point[0], box["y"] + point[1])


def click_first_patch(page) -> None:
    """Click the slide's first screened patch in the viewer, as a reviewer would, and wait for its panel."""
    box = page.locator("#viewer").bounding_box()
    point = page.evaluate(FIRST_PATCH_ON_SCREEN)
    page.mouse.click(box["x"] + point[0], box["y"] + point[1])
    page.wait_for_selector("body[data-picked]", timeout=30_000)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it with apt-get)")
def test_the_pages_in_a_headless_browser(slides, tiny_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "batch.zip").write_bytes(zip_of(slides))
    server = start_server(data, port, tiny_model)
    outside, tiles = [], []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--no-first-run", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
            page.on("response", lambda r: tiles.append(r.status) if "/mosaic_files/" in r.url else None)
            page.goto(url)
            assert "not a diagnosis" in page.content()
            hostile = '<img src=x onerror="window.pwned=1">'
            page.fill("#name", hostile)  # a job name is data: shown as text, never run
            page.set_input_files("#file", str(tmp_path / "batch.zip"))
            page.wait_for_selector("#jobs tr.job[data-status='done']", timeout=120_000)
            assert page.inner_text("#jobs tr.job a") == hostile and page.evaluate("window.pwned") is None
            job_id = page.get_attribute("#jobs tr.job", "data-id")
            page.click("#jobs tr.job a")
            page.wait_for_selector("#slides tr.slide")
            ranked = page.locator("#slides tr.slide td:nth-child(2)").all_inner_texts()
            assert len(ranked) == 3
            page.click("#slides th[data-key='patient']")  # sortable
            assert page.locator("#slides tr.slide td:nth-child(2)").all_inner_texts() == sorted(ranked)
            page.click("#slides th[data-key='rank']")
            page.click("#slides tr.slide:first-child td:nth-child(2) a")
            page.wait_for_selector("body[data-overlay='ready']", timeout=30_000)
            page.wait_for_timeout(1500)  # tiles drawn
            viewer = page.locator("#viewer")
            with_heatmap = viewer.screenshot()
            page.uncheck("#overlay-on")
            page.wait_for_timeout(800)
            without = viewer.screenshot()
            assert with_heatmap != without
            assert not page.is_visible("#picked-pair")  # no empty (broken) images before a patch is picked
            click_first_patch(page)
            assert "p(IDC)" in page.inner_text("#picked-facts")
            assert page.eval_on_selector("#picked-evidence", "img => img.complete && img.naturalWidth") == 200
            page.click("#marks button[data-label='1']")  # the reviewer labels the tile: ground truth for calibrate
            expect(page.locator("#mark-saved")).to_have_text("marked IDC")
            picked = [int(v) for v in page.get_attribute("body", "data-picked").split(",")]
            page.fill("#note", "nests look in situ")
            page.click(".verdicts button[data-verdict='disagree']")
            # locators, not wait_for_function: its string predicates are eval, which the page's CSP forbids
            expect(page.locator("#review-saved")).to_have_text(re.compile(r"^Saved"))
            page.reload()
            expect(page.locator("#review-saved")).to_contain_text("disagree")
            assert "nests look in situ" in page.inner_text("#review-saved")
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366  # fits a laptop screen
            marks = page.evaluate("async () => (await fetch(`/api/jobs/${document.body.dataset.job}/labels.csv`)).text()")
            assert marks.splitlines()[1:] == [f"{page.get_attribute('body', 'data-slide')},{picked[0]},{picked[1]},1"], marks
            # a link that smuggles markup into the job id, which the browser's \..\ would strip from the API call
            link = f'{url}/jobs/%22%3E%3Cimg%20src%3Dx%20onerror%3D%22window.pwned%3D1%22%3E%5C..%5C{job_id}'
            answer = page.goto(link)
            page.wait_for_timeout(500)
            assert answer.status == 404 and page.evaluate("window.pwned") is None
            assert "script-src 'self';" in answer.headers["content-security-policy"]
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert outside == [] and tiles and all(status == 200 for status in tiles)


def worker_pids(server_pid: int) -> list[int]:
    """The screening workers a server started, from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == server_pid and b"histoscreen.serving.worker" in command:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
def test_a_killed_worker_fails_its_job_with_the_reason_and_is_replaced(slides, tiny_model, tmp_path):
    import httpx

    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    orphan = data / "jobs" / "0000000000000-00000000dead"  # an upload killed mid-extraction
    (orphan / "input" / "900000").mkdir(parents=True)
    server = start_server(data, port, tiny_model)
    try:
        assert not orphan.exists()  # cleaned at start
        [worker] = worker_pids(server.pid)
        first = httpx.post(f"{url}/api/jobs", files={"file": ("a.zip", zip_of(slides))}).json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/jobs/{first}").json()["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer would
        while (job := httpx.get(f"{url}/api/jobs/{first}").json())["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job["status"] == "failed" and "worker died" in job["error"] and "SIGKILL" in job["error"], job
        while (health := httpx.get(f"{url}/api/health")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.json()["workers"] == 1 and health.json()["worker_restarts"] == 1
        assert worker_pids(server.pid) != [worker]
        second = httpx.post(f"{url}/api/jobs", files={"file": ("b.zip", zip_of(slides))}).json()["id"]
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{url}/api/jobs/{second}").json())["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["status"] == "done", job  # the replacement screens the next job
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_finders_resource_forks_in_a_zip_are_skipped_not_refused(tmp_path, slides):
    data = tmp_path / "data"
    good = sorted(slides.rglob("*.png"))[:3]
    members = [(str(p.relative_to(slides)), p.read_bytes()) for p in good]
    members += [("__MACOSX/" + name.rsplit("/", 1)[0] + "/._" + name.rsplit("/", 1)[1], b"\x00\x05\x16\x07") for name, _ in members]
    with TestClient(create_app(ServeSettings(data=data, start_workers=False)), base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/api/jobs", files={"file": ("from-a-mac.zip", zip_of_members(*members), "application/zip")})
        assert answer.status_code == 201, answer.text
    extracted = sorted(p.name for p in (data / "jobs" / answer.json()["id"] / "input").rglob("*.png"))
    assert extracted == sorted(p.name for p in good)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_api_docs_render_offline_with_every_outside_request_blocked(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with served(ServeSettings(data=tmp_path / "data", start_workers=False)) as port:
        url = f"http://127.0.0.1:{port}"
        outside, refused_scripts = [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((url, "data:"))
                       else (outside.append(route.request.url), route.abort()))
            page.on("console", lambda message: refused_scripts.append(message.text) if "Content Security Policy" in message.text else None)
            page.goto(f"{url}/docs")
            expect(page.locator(".opblock-summary-path", has_text="/api/jobs").first).to_be_visible(timeout=20_000)
            assert page.locator(".opblock").count() >= 10
            expect(page.locator(".info .title")).to_contain_text("histoscreen")
            browser.close()
    assert outside == [] and refused_scripts == [], (outside, refused_scripts)


@pytest.mark.parametrize("token", ["", "short", "a token with spaces", "tab\tseparated-token", "nul\x00in-the-token"])
def test_a_token_that_would_be_no_secret_is_refused_before_serving(tmp_path, token):
    from histoscreen.errors import SettingError

    with pytest.raises(SettingError, match="must be at least 12 printable characters without spaces"):
        ServeSettings(data=tmp_path / "data", token=token, start_workers=False)
    if "\x00" in token:
        return  # no process takes a NUL in its arguments
    result = subprocess.run([sys.executable, "-m", "histoscreen.cli", "serve", "--data", str(tmp_path / "data"), "--token", token,
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--token must be at least 12" in result.stderr, result
    assert not (tmp_path / "data").exists()


def test_a_reviewers_tile_marks_are_stored_refused_when_wrong_and_come_back_as_labels(slides, tiny_model, tmp_path):
    from histoscreen.tasks.steps import read_labels_csv

    with TestClient(create_app(ServeSettings(data=tmp_path / "data", model=str(tiny_model))), base_url="http://127.0.0.1:8000") as client:
        job_id = client.post("/api/jobs", files={"file": ("batch.zip", zip_of(slides), "application/zip")}).json()["id"]
        assert wait_done(client, job_id)["status"] == "done"
        slide = client.get(f"/api/jobs/{job_id}/slides").json()[0]["patient"]
        base = f"/api/jobs/{job_id}/slides/{slide}"
        first, second = client.get(f"{base}/patches").json()[:2]
        marked = client.put(f"{base}/tiles", json={"marks": [{"x": first["x"], "y": first["y"], "label": 1},
                                                             {"x": second["x"], "y": second["y"], "label": 0}]})
        assert marked.status_code == 200 and marked.json() == {"marked": 2}
        for marks, words in (([{"x": 999_999, "y": 1, "label": 1}], "no screened tile at x=999999"),
                             ([{"x": first["x"], "y": first["y"], "label": 2}], "label must be 1 (IDC), 0 (not IDC) or null")):
            refused = client.put(f"{base}/tiles", json={"marks": marks})
            assert refused.status_code == 422 and words in refused.text, refused.text
        client.put(f"{base}/tiles", json={"marks": [{"x": second["x"], "y": second["y"], "label": None}]})  # cleared
        # a drawn region: refused in one line when it cannot be one, and nothing stored
        for polygon, words in (([[0, 0], [10, 10]], "at least 3"), ([[0, 0], [1e300, 0], [0, 1e300]], "finite grid pixels"),
                               ([[0, 0], ["a", 0], [0, 9]], "valid number"),
                               ([[-900, -900], [-800, -900], [-800, -800]], "lies outside the slide"),
                               ([[0, 0], [10, 0], [0, 10]], "covers no screened tile")):
            refused = client.put(f"{base}/region", json={"polygon": polygon, "label": 0})
            assert refused.status_code == 422 and words in refused.text, refused.text
        assert client.put(f"{base}/region", json={"polygon": [[0, 0]] * 10_001, "label": 0}).status_code == 422
        assert [(m["x"], m["y"], m["label"]) for m in client.get(f"{base}/tiles").json()] == [(first["x"], first["y"], 1)]
        (tmp_path / "labels.csv").write_text(client.get(f"/api/jobs/{job_id}/labels.csv").text)
    assert read_labels_csv(tmp_path / "labels.csv") == {(slide, first["x"], first["y"]): 1}


def wait_for_job(url: str, job_id: str, seconds: float = 180) -> dict:
    import httpx

    deadline = time.monotonic() + seconds
    while (job := httpx.get(f"{url}/api/jobs/{job_id}").json())["status"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.3)
    return job


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it with apt-get)")
def test_a_lab_adapts_the_model_from_its_reviews_and_new_jobs_are_scored_by_the_active_version(tiny_model, tmp_path):
    """The whole loop of issue 26: a reviewer labels a drawn region and a tile in the viewer, the lab builds a
    calibrated version from its reviewed job, reads its before/after estimate, makes it
    active, and the next job is scored by it (its digests in the job); the server's own model
    is never changed and can be made active again."""
    import httpx
    from playwright.sync_api import expect, sync_playwright

    lab = tmp_path / "lab"
    synthesize(lab, patients=5, seed=23, first_index=70, idc_fractions=[0.3, 0.0, 0.2, 0.4, 0.1])
    shipped = model_digests(tiny_model)
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(data, port, tiny_model)
    try:
        reviewed = httpx.post(f"{url}/api/jobs", files={"file": ("lab.zip", zip_of(lab))}).json()["id"]
        assert wait_for_job(url, reviewed)["status"] == "done"
        assert httpx.post(f"{url}/api/models", json={"jobs": ["0" * 13 + "-" + "0" * 12]}).status_code == 404
        assert httpx.post(f"{url}/api/models/not-a-version/activate").status_code == 404
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"{url}/jobs/{reviewed}")
            page.click("#slides tr.slide:first-child td:nth-child(2) a")
            page.wait_for_selector("body[data-overlay='ready']", timeout=30_000)
            slide = page.get_attribute("body", "data-slide")
            first = httpx.get(f"{url}/api/jobs/{reviewed}/slides/{slide}/patches").json()[0]
            # a region drawn around the first patch's tile and its 8 neighbours, labelled IDC
            page.click("#region-draw")
            for dx, dy in ((-51, -51), (99, -51), (99, 99), (-51, 99)):
                click_grid_point(page, first["x"] + dx, first["y"] + dy)
            expect(page.locator("#region-count")).to_have_text("4 corners.")
            page.screenshot(path=str(tmp_path / "region.png"))
            page.click("#region-actions button[data-label='1']")
            expect(page.locator("#region-saved")).to_have_text(re.compile(r"^\d+ tiles? marked IDC$"))
            block = {(p["x"], p["y"]) for p in httpx.get(f"{url}/api/jobs/{reviewed}/slides/{slide}/patches").json()
                     if abs(p["x"] - first["x"]) <= 50 and abs(p["y"] - first["y"]) <= 50}
            assert page.inner_text("#region-saved") == f"{len(block)} tiles marked IDC" and len(block) >= 4
            click_first_patch(page)
            page.click("#marks button[data-label='0']")  # then overrules the region for one tile
            expect(page.locator("#mark-saved")).to_have_text("marked not IDC")
            picked = page.get_attribute("body", "data-picked")
            assert picked == f"{first['x']},{first['y']}"
            page.click("header nav a[href='/models']")
            expect(page.locator("#adapt-jobs tbody tr")).to_have_count(1)
            expect(page.locator("#adapt-jobs tbody tr td").nth(3)).to_have_text(str(len(block)))  # the marked tiles
            expect(page.locator("#versions tr.version")).to_have_count(1)  # the shipped model alone
            page.fill("#version-name", "our lab")
            page.click("#adapt")
            expect(page.locator("#adapt-status")).to_have_text(re.compile("^(built|failed)"), timeout=240_000)
            assert page.inner_text("#adapt-status") == "built: see its estimate below"
            built = page.locator("#versions tr.version", has_text="our lab")
            expect(built).to_contain_text("before: sens")
            expect(built).to_contain_text("after: sens")
            expect(built).to_contain_text("on 5 patients")
            page.screenshot(path=str(tmp_path / "adapt.png"), full_page=True)
            built.locator("button.activate").click()
            expect(page.locator("#activate-status")).to_contain_text("active now")
            expect(built).to_have_attribute("data-active", "true")
            version = built.get_attribute("data-id")
            browser.close()
        versions = httpx.get(f"{url}/api/models").json()
        assert versions["active"] == version
        new = next(v for v in versions["versions"] if v["id"] == version)
        assert new["jobs"] == [reviewed] and new["based_on"] == "shipped" and new["weights_sha256"] == shipped["weights"]
        assert new["estimate"]["patients"] == 5 and set(new["estimate"]) >= {"before", "after"}
        with open(data / "models" / version / "labels.csv", newline="") as handle:  # the mark, as the calibration read it
            marked = {(int(r["x"]), int(r["y"])): r["label"] for r in csv.DictReader(handle) if r["patient"] == slide}
        assert marked == {tile: "0" if tile == (first["x"], first["y"]) else "1" for tile in block}
        later = httpx.post(f"{url}/api/jobs", files={"file": ("later.zip", zip_of(lab))}).json()["id"]
        assert wait_for_job(url, later)["status"] == "done"
        scored_by = httpx.get(f"{url}/api/jobs/{later}").json()["model"]
        assert scored_by == {"version": version, "name": "our lab", "weights_sha256": new["weights_sha256"],
                             "scoring_sha256": new["scoring_sha256"]}
        assert httpx.get(f"{url}/api/jobs/{reviewed}").json()["model"]["version"] == "shipped"
        assert new["scoring_sha256"] != shipped["scoring"] and model_digests(tiny_model) == shipped  # never changed
        assert httpx.post(f"{url}/api/models/shipped/activate").json() == {"active": "shipped"}
        assert httpx.post(f"{url}/api/models", json={"jobs": [version]}).status_code == 409  # an adapt job is no review
        for path in ("slides", "slides.csv", "report.zip", "labels.csv"):  # nor has it a report to serve
            refused = httpx.get(f"{url}/api/jobs/{version}/{path}")
            assert refused.status_code == 409 and "not a report" in refused.text, (path, refused.text)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
