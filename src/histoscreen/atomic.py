"""Writing outputs so that no input and nothing finished is ever lost.

Everything is written under a temporary name beside its destination (same file system,
so the final rename is atomic) and renamed into place only when it is complete. An output
may never be, contain or sit inside one of the run's inputs, whatever the flags; an
existing output is replaced only when asked to, and an existing folder only when
histoscreen wrote it (it holds the OUTPUT_MARK file every output folder gets).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from histoscreen.errors import OutputExistsError, UnsafeOutputError

_PARTIAL_MARK = ".partial-"
OUTPUT_MARK = ".histoscreen-output"


def guard_output(destination: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that equals, contains or sits inside one of the inputs."""
    target = Path(destination).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise UnsafeOutputError(f"{destination} is also an input; choose an output path apart from the inputs")
        if source.is_relative_to(target):
            raise UnsafeOutputError(f"{destination} contains the input {given}; choose an output path apart from the inputs")
        if target.is_relative_to(source) and source.is_dir():
            raise UnsafeOutputError(f"{destination} lies inside the input {given}; choose an output path apart from the inputs")


def is_histoscreen_output(folder: Path) -> bool:
    return (folder / OUTPUT_MARK).is_file()


def check_output_folder(destination: Path, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """What atomic_folder checks before it writes; call it early to fail before long work."""
    destination = Path(destination)
    guard_output(destination, inputs)
    if destination.exists() or destination.is_symlink():
        if not overwrite:
            raise OutputExistsError(destination)
        if destination.is_symlink() or not destination.is_dir() or not is_histoscreen_output(destination):
            raise UnsafeOutputError(
                f"{destination} exists and was not written by histoscreen (it has no {OUTPUT_MARK}), so it is "
                "never replaced; remove it yourself or choose another path"
            )


def child_path(root: Path, *parts: str) -> Path:
    """root/parts..., refused when the parts (a slide id from the data, say) would lead out of root."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()) or any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
        raise UnsafeOutputError(f"{'/'.join(parts)!r} would be written outside {root}")
    return path


@contextmanager
def atomic_folder(destination: Path, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (), kind: str = "output") -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `destination` when the block succeeds.

    On any error (or Ctrl-C) the temporary folder is removed and `destination` is left as
    it was. With `overwrite`, an existing destination that histoscreen wrote is replaced
    only after the new one is complete; anything else is never removed.
    """
    destination = Path(destination)
    check_output_folder(destination, overwrite=overwrite, inputs=inputs)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(destination)
    partial = destination.parent / f".{destination.name}{_PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        mark = {"written_by": "histoscreen", "kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (partial / OUTPUT_MARK).write_text(json.dumps(mark) + "\n")
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if destination.exists() and overwrite:
        retired = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        os.replace(destination, retired)
        os.replace(partial, destination)
        _remove_path(retired)
        return
    try:  # rename refuses a non-empty folder: a run that finished first keeps its output
        os.rename(partial, destination)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if destination.exists():
            raise OutputExistsError(destination) from None
        raise


def check_output_file(destination: Path, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output file that is or sits in an input, an existing file unless asked to
    replace it, and a folder always."""
    guard_output(destination, inputs)
    if destination.is_dir():
        raise UnsafeOutputError(f"{destination} is a folder; this output is a file")
    if destination.exists() and not overwrite:
        raise OutputExistsError(destination, "file")


def atomic_write_bytes(destination: Path, payload: bytes, *, replace: bool = True) -> None:
    """Write under a fresh temporary name (created exclusively, so a planted link is never
    followed), then rename into place; on any failure (a full disk) nothing is left behind
    and an existing destination is untouched. Without `replace`, a destination that appeared
    meanwhile (another run) is kept and OutputExistsError raised."""
    destination = Path(destination)
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}{_PARTIAL_MARK}{os.getpid()}-", dir=destination.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 is not what a user's files get
            file.write(payload)
        if replace:
            os.replace(temporary, destination)
        else:
            try:
                os.link(temporary, destination)
            except FileExistsError:
                raise OutputExistsError(destination, "file") from None
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(destination: Path, text: str, *, replace: bool = True) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"), replace=replace)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _remove_stale_partials(destination: Path) -> None:
    """Clear what killed runs left behind, but never the folder of a run still going."""
    prefix = f".{destination.name}{_PARTIAL_MARK}"
    for leftover in destination.parent.glob(prefix + "*"):
        pid_text = leftover.name[len(prefix):].split("-")[0]
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
