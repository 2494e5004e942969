#!/usr/bin/env python3
"""Carry the real patches to a lent GPU machine in pieces, and rebuild the stores there.

usage: python benchmarks/gpu_data.py pack DEST [--chunk-mib 56.5]
       python benchmarks/gpu_data.py unpack CHUNKS... --meta META --work WORK

A call to the GPU machine carries at most 64 MiB with the working tree, and the real patches
are 246 MiB of lossless WebP (../shared/data/idc/*.zip). `pack` cuts the four zips, end to
end, into chunks of --chunk-mib (DEST/c1, c2, ...; one call each onto the same warm machine)
and writes DEST/meta: the index of the store to rebuild (all 143 patients at full density,
.cache/cv/store, which both the CV's fold networks and the shipped network train from) with
the SHA-256 of its pixels.
`unpack` joins the chunks, decodes every patch (all cores), pads edge patches as `prepare`
does, writes each store's patches in its index order and refuses a store whose pixels do
not hash as they did here: the GPU trains on exactly the patches the CPU has.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "idc"
ZIPS = ("train.zip", "val.zip", "val_rest.zip", "extra.zip")
STORES = {"cv": REPO / ".cache" / "cv" / "store"}
SMALL_FILES = ("store.json", "index.parquet", "rejects.csv", "conflicts.csv")


def pixels_digest(patches: np.ndarray) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(patches), 4096):
        digest.update(np.ascontiguousarray(patches[start : start + 4096]).tobytes())
    return digest.hexdigest()


def pack(dest: Path, chunk_mib: float) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    chunk_bytes = int(chunk_mib * 2**20)
    sizes = [(SHARED / name).stat().st_size for name in ZIPS]
    meta = dest / "meta"
    meta.mkdir(exist_ok=True)
    chunks, buffer = 0, b""
    for name in ZIPS:
        with open(SHARED / name, "rb") as handle:
            while block := handle.read(chunk_bytes - len(buffer)):
                buffer += block
                if len(buffer) == chunk_bytes:
                    chunks += 1
                    (dest / f"c{chunks}").write_bytes(buffer)
                    buffer = b""
    if buffer:
        chunks += 1
        (dest / f"c{chunks}").write_bytes(buffer)
    stores = {}
    for name, store in STORES.items():
        (meta / name).mkdir(exist_ok=True)
        for small in SMALL_FILES:
            if (store / small).exists():
                shutil.copy(store / small, meta / name / small)
        stores[name] = pixels_digest(np.load(store / "patches.npy", mmap_mode="r"))
    (meta / "manifest.json").write_text(json.dumps({"zips": dict(zip(ZIPS, sizes)), "chunks": chunks, "sha256": stores}, indent=1))
    print(f"{dest}: {chunks} chunks of up to {chunk_mib} MiB, and meta/ ({', '.join(STORES)} stores)")


def _decode(item: tuple[str, bytes]) -> tuple[str, np.ndarray]:
    """A patch padded with background to full size, as `histoscreen prepare` stores it."""
    from PIL import Image

    from histoscreen.data.patch_files import padded_patch

    name, data = item
    return name, padded_patch(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def _key(member: str) -> tuple[str, int, int]:
    """(patient, x, y) of '<patient>/<label>/<patient>_idx5_x<X>_y<Y>_class<C>.webp'."""
    base = member.rsplit("/", 1)[1]
    patient, rest = base.split("_idx5_x")
    x, rest = rest.split("_y")
    return patient, int(x), int(rest.split("_class")[0])


def unpack(chunks: list[Path], meta: Path, work: Path) -> dict[str, Path]:
    import pandas as pd

    manifest = json.loads((meta / "manifest.json").read_text())
    joined = b"".join(chunk.read_bytes() for chunk in sorted(chunks, key=lambda c: int(c.name[1:])))
    if len(joined) != sum(manifest["zips"].values()):
        sys.exit(f"the chunks hold {len(joined):,} bytes, the zips {sum(manifest['zips'].values()):,}: a chunk is missing")
    members: list[tuple[str, bytes]] = []
    offset = 0
    for name, size in manifest["zips"].items():
        with zipfile.ZipFile(io.BytesIO(joined[offset : offset + size])) as archive:
            members += [(m, archive.read(m)) for m in archive.namelist() if m.endswith(".webp")]
        offset += size
    with ProcessPoolExecutor() as pool:
        decoded = {_key(name): pixels for name, pixels in pool.map(_decode, members, chunksize=512)}
    stores = {}
    for name, digest in manifest["sha256"].items():
        store = work / name
        store.mkdir(parents=True, exist_ok=True)
        for small in SMALL_FILES:
            if (meta / name / small).exists():
                shutil.copy(meta / name / small, store / small)
        index = pd.read_parquet(store / "index.parquet")
        keys = zip(index["patient"].astype(str), index["x"].astype(int), index["y"].astype(int))
        patches = np.stack([decoded[key] for key in keys])
        if pixels_digest(patches) != digest:
            sys.exit(f"{store}: the rebuilt pixels do not hash as the store's here; not using it")
        np.save(store / "patches.npy", patches)
        stores[name] = store
        print(f"{store}: {len(patches):,} patches, pixels identical to the store they were packed from", flush=True)
    return stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack")
    packing.add_argument("dest", type=Path)
    packing.add_argument("--chunk-mib", type=float, default=56.5)
    unpacking = verbs.add_parser("unpack")
    unpacking.add_argument("chunks", type=Path, nargs="+")
    unpacking.add_argument("--meta", type=Path, required=True)
    unpacking.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.verb == "pack":
        pack(args.dest, args.chunk_mib)
    else:
        unpack(args.chunks, args.meta, args.work)


if __name__ == "__main__":
    main()
