"""Writing outputs so that a killed run never leaves something that looks finished.

Everything is written under a temporary name beside its destination (same file system,
so the final rename is atomic) and renamed into place only when it is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histoscreen.errors import OutputExistsError, UnsafeOutputError

_PARTIAL_MARK = ".partial-"


@contextmanager
def atomic_folder(destination: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `destination` when the block succeeds.

    On any error (or Ctrl-C) the temporary folder is removed and `destination` is left as
    it was. With `overwrite`, an existing destination is replaced only after the new one
    is complete.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(destination)
    partial = destination.parent / f".{destination.name}{_PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if destination.exists():
        retired = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        os.replace(destination, retired)
        os.replace(partial, destination)
        _remove_path(retired)
    else:
        os.replace(partial, destination)


def check_output_file(destination: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked to, and never replace a folder."""
    if destination.is_dir():
        raise UnsafeOutputError(f"{destination} is a folder; this output is a file")
    if destination.exists() and not overwrite:
        raise OutputExistsError(destination, "file")


def atomic_write_bytes(destination: Path, payload: bytes) -> None:
    destination = Path(destination)
    temporary = destination.parent / f".{destination.name}{_PARTIAL_MARK}{os.getpid()}"
    temporary.write_bytes(payload)
    os.replace(temporary, destination)


def atomic_write_text(destination: Path, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))


def _remove_stale_partials(destination: Path) -> None:
    """Clear what killed runs left behind, but never the folder of a run still going."""
    prefix = f".{destination.name}{_PARTIAL_MARK}"
    for leftover in destination.parent.glob(prefix + "*"):
        pid_text = leftover.name[len(prefix):]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            _remove_path(leftover)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
