#!/usr/bin/env python3
"""Load on the web app, over loopback: many clients reading while uploads are screened.

usage: python benchmarks/serve_load.py [--clients 50] [--seconds 30] [--uploads 4]

Starts `histoscreen serve` (shipped model, one screening worker) on a free local port,
screens one batch so there is something to read, then for --seconds runs --clients
concurrent clients reading the job list, a job, a job's slides, a slide's patches and
Deep Zoom tiles, while --uploads more batches (SYNTHETIC slides, a zip each) are uploaded
and screened. Prints requests, errors, p50/p95/max latency per endpoint and the server's
peak memory (its whole process tree, the worker included).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from measure import _anonymous_kib, _tree, cpu_model


def batch_zip(folder: Path, seed: int) -> bytes:
    from histoscreen.data import synthesize

    synthesize(folder, patients=3, seed=seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder))
    return buffer.getvalue()


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--uploads", type=int, default=4)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        zips = [batch_zip(work / f"batch-{i}", seed=100 + i) for i in range(args.uploads + 1)]
        server = subprocess.Popen([sys.executable, "-m", "histoscreen.cli", "serve", "--data", str(work / "data"), "--port", str(port), "-q"])
        peak, stop = [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(_anonymous_kib(p) for p in _tree(server.pid)))
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()
        try:
            for _ in range(300):
                try:
                    httpx.get(f"{url}/api/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            first = httpx.post(f"{url}/api/jobs", files={"file": ("first.zip", zips[0])}, timeout=60).json()["id"]
            while httpx.get(f"{url}/api/jobs/{first}").json()["status"] not in ("done", "failed"):
                time.sleep(0.5)
            slides = httpx.get(f"{url}/api/jobs/{first}/slides").json()
            slide = slides[0]["patient"]
            latencies: dict[str, list[float]] = {}
            errors: list[str] = []

            async def client(number: int, deadline: float) -> None:
                endpoints = {
                    "GET /api/jobs": "/api/jobs",
                    "GET /api/jobs/{id}": f"/api/jobs/{first}",
                    "GET /api/jobs/{id}/slides": f"/api/jobs/{first}/slides",
                    "GET .../slides/{slide}/patches": f"/api/jobs/{first}/slides/{slide}/patches",
                    "GET .../mosaic_files/{level}/{tile}": f"/api/jobs/{first}/slides/{slide}/mosaic_files/{{level}}/0_0.jpeg",
                }
                rng = random.Random(number)
                async with httpx.AsyncClient(base_url=url, timeout=30) as session:
                    while time.monotonic() < deadline:
                        name, path = rng.choice(list(endpoints.items()))
                        path = path.replace("{level}", str(rng.randint(5, 11)))
                        started = time.perf_counter()
                        try:
                            response = await session.get(path)
                            if response.status_code != 200:
                                errors.append(f"{name}: {response.status_code}")
                        except httpx.HTTPError as error:
                            errors.append(f"{name}: {type(error).__name__}")
                        latencies.setdefault(name, []).append(time.perf_counter() - started)

            async def uploads() -> list[str]:
                async with httpx.AsyncClient(base_url=url, timeout=120) as session:
                    answers = [await session.post("/api/jobs", files={"file": (f"b{i}.zip", data)}) for i, data in enumerate(zips[1:])]
                return [a.json()["id"] for a in answers if a.status_code == 201]

            async def run() -> list[str]:
                deadline = time.monotonic() + args.seconds
                results = await asyncio.gather(uploads(), *(client(i, deadline) for i in range(args.clients)))
                return results[0]

            started = time.perf_counter()
            submitted = asyncio.run(run())
            elapsed = time.perf_counter() - started
            states = [httpx.get(f"{url}/api/jobs/{j}").json()["status"] for j in submitted]
        finally:
            stop.set()
            server.terminate()
            server.wait(timeout=30)

    total = sum(len(v) for v in latencies.values())
    print(f"{args.clients} clients for {elapsed:.0f} s on loopback while {len(submitted)} of {args.uploads} uploads were "
          f"accepted ({states.count('done')} screened by the end, the rest {', '.join(sorted(set(states) - {'done'})) or 'none'}); "
          f"shipped model, 1 worker; {cpu_model()}")
    print(f"requests: {total:,} ({total / elapsed:,.0f}/s), errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"{'endpoint':40} {'requests':>9} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, values in latencies.items():
        ms = np.array(values) * 1000
        print(f"{name:40} {len(ms):9,} {np.percentile(ms, 50):8.1f} {np.percentile(ms, 95):8.1f} {ms.max():8.1f}")
    print(f"server peak memory (server and worker): {peak[0] / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
