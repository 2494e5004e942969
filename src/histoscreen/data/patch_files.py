"""Reading single patch files: finding them, checking their names and decoding their pixels.

Every check returns a reason a person can act on, so a bad file is reported, never
silently dropped. `sources.FileSource` is their one user.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import struct
import warnings
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histoscreen.checks import whole_number
from histoscreen.constants import (
    BACKGROUND_RGB,
    GRID_STEP,
    MAX_SLIDE_PX,
    PATCH_NAME_HINT,
    PATCH_SIZE,
)
from histoscreen.data.naming import PatchName, on_grid, parse_patch_name
from histoscreen.problems import Problem, is_utf8_name, printable_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_MODE_DESCRIPTIONS = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "I": "32-bit grayscale",
    "I;16": "16-bit grayscale",
    "P": "palette",
    "RGBA": "RGB with an alpha channel",
    "CMYK": "CMYK",
}


@dataclass(frozen=True)
class DecodedPatch:
    """A patch padded to PATCH_SIZE x PATCH_SIZE, or the reason it could not be read."""

    pixels: np.ndarray | None  # uint8, PATCH_SIZE x PATCH_SIZE x 3
    width: int
    height: int
    digest: bytes
    reason: str | None


def find_files(folder: Path) -> tuple[list[str], list[Problem]]:
    """Every non-hidden file below `folder`, in a stable order, and what could not be
    searched: unreadable folders, symbolic links to folders (not followed, so a search never
    leaves the folder it was given) and names that are not UTF-8. Paths are plain strings:
    the Kaggle set has half a million files, and a Path object costs several times more."""
    found: list[str] = []
    problems: list[Problem] = []

    def unreadable(error: OSError) -> None:
        problems.append(Problem(printable_path(error.filename or folder), f"unreadable folder ({error.strerror or error})"))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        searched = []
        for name in sorted(dirs):
            path = Path(root, name)
            if name.startswith("."):
                continue
            if not is_utf8_name(name):
                problems.append(Problem(printable_path(path), "folder name is not valid UTF-8; not searched"))
            elif path.is_symlink():
                problems.append(Problem(str(path), "symbolic link to a folder; not followed (copy the folder instead)"))
            else:
                searched.append(name)
        dirs[:] = searched
        for name in sorted(files):
            if name.startswith("."):
                continue
            if not is_utf8_name(name):
                problems.append(Problem(printable_path(Path(root, name)), "file name is not valid UTF-8"))
            else:
                found.append(os.path.join(root, name))
    return found, problems


def check_name(path: str | os.PathLike) -> tuple[PatchName | None, str | None]:
    """Parse the file name and check it against the folders it sits in.

    The Kaggle layout is <patient>/<0|1>/<name>; when those folders are present they
    must agree with the name, since a disagreement means a label or patient mix-up.
    """
    folder, file_name = os.path.split(os.fspath(path))
    suffix = os.path.splitext(file_name)[1]
    if suffix.lower() != ".png":
        return None, f"not a .png file (suffix {suffix or 'none'!r})"
    name = parse_patch_name(file_name)
    if name is None:
        return None, f"name does not match {PATCH_NAME_HINT}"
    for axis, value in (("x", name.x), ("y", name.y)):
        if value > MAX_SLIDE_PX:
            return None, f"{axis}={value} lies beyond any slide (more than {MAX_SLIDE_PX:,} px)"
        if not on_grid(value):
            return None, f"{axis}={value} is not on the {GRID_STEP}-px grid (1, 51, 101, ...)"
    label_folder = os.path.basename(folder)
    if label_folder in ("0", "1"):
        if int(label_folder) != name.label:
            return None, f"label class{name.label} in the name disagrees with its folder {label_folder}/"
        patient_folder = os.path.basename(os.path.dirname(folder))
        if patient_folder.isdigit() and patient_folder != name.patient:
            return None, f"named for patient {name.patient} but stored in patient folder {patient_folder}/"
    return name, None


def padded_patch(pixels: np.ndarray) -> np.ndarray:
    """An edge patch (smaller than 50 x 50) padded right and below with background, as stores hold it."""
    padded = np.empty((PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    padded[:] = BACKGROUND_RGB
    padded[: pixels.shape[0], : pixels.shape[1]] = pixels
    return padded


def decode_patch_bytes(data: bytes) -> DecodedPatch:
    """Decode one patch PNG, padding edge patches with background to the full size."""
    if not data:
        return _rejected("empty file (0 bytes)")
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        # IHDR comes first: refuse a huge image from its header, before any decoder sees it
        width, height = struct.unpack(">II", data[16:24])
        if width > PATCH_SIZE or height > PATCH_SIZE or width < 1 or height < 1:
            return _rejected(f"size {width}x{height} does not fit in {PATCH_SIZE}x{PATCH_SIZE}")
    try:
        with warnings.catch_warnings(), Image.open(BytesIO(data)) as image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if image.format != "PNG":
                return _rejected(f"not a PNG image (format {image.format})")
            width, height = image.size
            # Checked before decoding, so an oversized file cannot exhaust memory.
            if width > PATCH_SIZE or height > PATCH_SIZE or width < 1 or height < 1:
                return _rejected(f"size {width}x{height} does not fit in {PATCH_SIZE}x{PATCH_SIZE}")
            if image.mode != "RGB":
                described = _MODE_DESCRIPTIONS.get(image.mode, image.mode)
                return _rejected(f"{described} image (mode {image.mode}); expected 8-bit RGB")
            image.load()
            pixels = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        return _rejected("not an image (unreadable as PNG)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _rejected(f"image far larger than a patch ({error})")
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        return _rejected(f"corrupt or truncated PNG ({error})")
    padded = padded_patch(pixels)
    digest = hashlib.blake2b(padded.tobytes(), digest_size=16)
    digest.update(f"{width}x{height}".encode())
    return DecodedPatch(padded, width, height, digest.digest(), None)


@dataclass
class DecodedChunk:
    """Decoded patches of one chunk of files, packed so that workers send one array."""

    pixels: np.ndarray  # n x PATCH_SIZE x PATCH_SIZE x 3; rows of rejected files are zero
    widths: list[int]
    heights: list[int]
    digests: list[bytes]
    reasons: list[str | None]


def _decode_chunk(items: list[tuple[str, Hashable]]) -> DecodedChunk:
    pixels = np.zeros((len(items), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    chunk = DecodedChunk(pixels, [], [], [], [])
    previous_key, previous_bytes, previous = None, b"", None
    for row, (path, key) in enumerate(items):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            data, decoded = b"", _rejected(f"unreadable file ({error.strerror or error})")
        else:
            # The archive's two copies of a patch come one after the other and are
            # usually the same file byte for byte: decode such a twin only once.
            if key == previous_key and data and data == previous_bytes:
                decoded = previous
            else:
                decoded = decode_patch_bytes(data)
        if decoded.pixels is not None:
            pixels[row] = decoded.pixels
        chunk.widths.append(decoded.width)
        chunk.heights.append(decoded.height)
        chunk.digests.append(decoded.digest)
        chunk.reasons.append(decoded.reason)
        previous_key, previous_bytes, previous = key, data, decoded
    return chunk


def decode_files(
    items: list[tuple[str, Hashable]], workers: int | None = None, chunk_size: int = 256
) -> Iterator[tuple[list[str], DecodedChunk]]:
    """Decode (path, key) items in chunks, in order, in worker processes.

    Items with equal keys next to each other whose files are byte-identical are decoded
    once (the Kaggle archive's twins). Each chunk comes with its paths.
    """
    if workers is not None:
        whole_number("workers", workers)
    workers = workers or os.cpu_count() or 1
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    if workers == 1 or len(chunks) < 2:
        for chunk in chunks:
            yield [path for path, _ in chunk], _decode_chunk(chunk)
        return
    # A forked worker must import nothing: a module that another thread (a report writer, a
    # web request) was importing at the fork stays locked in the child for ever. Opening a
    # PNG imports Pillow's formats on first use, so they are imported here, in the forking
    # thread, which waits for any import of them already under way.
    Image.init()
    # imap keeps the order and only a few chunks in flight, so memory stays bounded
    # whatever the size of the set. Freezing the garbage collector's view of the parent's
    # objects keeps forked workers from touching (and so copying) every page of them.
    gc.freeze()
    with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        for chunk, decoded in zip(chunks, pool.imap(_decode_chunk, chunks)):
            yield [path for path, _ in chunk], decoded


def _rejected(reason: str) -> DecodedPatch:
    return DecodedPatch(None, 0, 0, b"", reason)
