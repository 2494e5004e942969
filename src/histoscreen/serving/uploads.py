"""Taking an upload apart safely: what a hostile file can do is refused before anything is
written outside the job's own folder.

- A zip is read only through its central directory, checked member by member before a
  single byte is extracted: absolute paths, drive letters, `..`, backslashes and symbolic
  links are refused (zip-slip); the declared uncompressed total is capped (a zip bomb is
  refused before it is expanded), and the bytes actually written are counted too, since a
  declared size can lie. Only .png members are extracted; anything else is left in the zip.
- A whole-slide image is stored under a name made from a safe slug, never from the upload's
  file name; only its suffix (from a fixed list) is kept.
"""

from __future__ import annotations

import errno
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from histoscreen.constants import PATCH_NAME_HINT
from histoscreen.data.naming import parse_patch_name
from histoscreen.data.wsi import SLIDE_SUFFIXES
from histoscreen.errors import HistoscreenError

ZIP_MAGIC = b"PK\x03\x04"
MAX_MEMBERS = 2_000_000
MAX_DEPTH = 32  # folders in a member's path: a patient folder, a class folder and a few above
MAX_NAME_BYTES = 255  # one path component, as file systems allow
READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_DRIVE = re.compile(r"^[A-Za-z]:")
_SLUG_OUT = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(HistoscreenError):
    """An upload refused; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def slug(text: str, fallback: str = "slide") -> str:
    """A safe slide id from any text: letters, digits, '.', '_', '-'; never empty, never dots only."""
    cleaned = _SLUG_OUT.sub("-", text).strip(".-_")[:100]
    return cleaned if cleaned and cleaned[0].isalnum() else fallback


def upload_kind(first_bytes: bytes, file_name: str) -> str:
    if first_bytes.startswith(ZIP_MAGIC):
        return "patches"
    if file_name.lower().endswith(SLIDE_SUFFIXES):
        return "slide"
    raise UploadError(415, "the upload is neither a zip of patch PNGs nor a whole-slide image (.svs, .tif, .ndpi, .mrxs, ...)")


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be extracted, or None."""
    name = info.filename
    if "\\" in name or "\x00" in name:
        return "a name with a backslash or NUL"
    if name.startswith("/") or _DRIVE.match(name):
        return "an absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "a '..' in its path"
    if len(parts) > MAX_DEPTH:
        return f"a path {len(parts)} folders deep (at most {MAX_DEPTH})"
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in parts):
        return f"a name longer than {MAX_NAME_BYTES} bytes"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "encryption (encrypted zips are not read)"
    if info.compress_type not in READABLE_COMPRESSION:
        return f"compression method {info.compress_type}, which this reader does not know"
    return None


def clashing_names(members: list[zipfile.ZipInfo]) -> str | None:
    """A member that is both a file and a folder (a.png and a.png/b.png), or given twice."""
    files, folders = set(), set()
    for info in members:
        parts = PurePosixPath(info.filename).parts
        folders.update("/".join(parts[:end]) for end in range(1, len(parts)))
        if info.is_dir():
            folders.add("/".join(parts))
        else:
            key = "/".join(parts)
            if key in files:
                return f"zip member {info.filename!r} is given twice"
            files.add(key)
    both = files & folders
    return f"zip member {sorted(both)[0]!r} is both a file and a folder" if both else None


def extract_patches(zip_path: Path, destination: Path, *, max_uncompressed: int) -> int:
    """Extract the .png members of `zip_path` under `destination`; returns how many.

    Every member is checked first; one bad member refuses the whole upload, and nothing is
    written outside `destination` (each path is resolved and checked as well)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UploadError(400, f"not a readable zip file ({error})") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise UploadError(413, f"the zip holds {len(members):,} members; at most {MAX_MEMBERS:,} are accepted")
        for info in members:
            problem = member_problem(info)
            if problem:
                raise UploadError(400, f"zip member {_shown(info.filename)} has {problem}; refused")
        clash = clashing_names(members)
        if clash:
            raise UploadError(400, f"{clash}; refused")
        declared = sum(info.file_size for info in members)
        if declared > max_uncompressed:
            raise UploadError(413, f"the zip expands to {declared:,} bytes; at most {max_uncompressed:,} are accepted")
        patches = [info for info in members if not info.is_dir() and info.filename.lower().endswith(".png") and not _macos_extra(info.filename)]
        if not patches:
            raise UploadError(422, "the zip holds no .png patches")
        misnamed = next((info for info in patches if parse_patch_name(PurePosixPath(info.filename).name) is None), None)
        if misnamed is not None:  # refused now, not after the upload was queued and screened
            raise UploadError(422, f"zip member {_shown(misnamed.filename)} is not named {PATCH_NAME_HINT} (the Kaggle layout); "
                                   "every patch's name must give its patient, place and class")
        root = destination.resolve()
        written = 0
        for info in patches:
            target = (destination / PurePosixPath(info.filename)).resolve()
            if not target.is_relative_to(root):
                raise UploadError(400, f"zip member {info.filename!r} would be written outside the job")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_uncompressed:  # the sizes in the directory lied
                            raise UploadError(413, f"the zip expands beyond {max_uncompressed:,} bytes; refused")
                        sink.write(chunk)
            except UploadError:
                shutil.rmtree(destination, ignore_errors=True)
                raise
            except (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error, RuntimeError, ValueError) as error:
                shutil.rmtree(destination, ignore_errors=True)  # a bad CRC, a truncated or undecodable member
                raise UploadError(400, f"zip member {_shown(info.filename)} cannot be read ({error}); refused") from None
            except OSError as error:
                shutil.rmtree(destination, ignore_errors=True)
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise UploadError(507, "the server's disk is full; the upload was not kept") from None
                raise UploadError(400, f"zip member {_shown(info.filename)} cannot be written ({error.strerror}); refused") from None
    return len(patches)


def _macos_extra(name: str) -> bool:
    """The resource-fork copies macOS's Finder adds to a zip ('__MACOSX/', '._x.png'): skipped."""
    path = PurePosixPath(name)
    return path.parts[0] == "__MACOSX" or path.name.startswith("._")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:60] + "..." + name[-40:])


def slide_file_name(upload_name: str, name: str) -> str:
    """The stored name of an uploaded slide: a slug of the job's name (the slide's id in the
    report) and the upload's suffix, taken from the fixed list only."""
    suffix = next(s for s in SLIDE_SUFFIXES if upload_name.lower().endswith(s))
    return slug(name or PurePosixPath(upload_name.replace("\\", "/")).stem) + suffix
