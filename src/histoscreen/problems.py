"""The one record of something that could not be used: a file, a folder or a whole slide,
with the reason. Every stage reports problems this way; none is dropped in silence."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    where: str
    reason: str


def printable_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed and written as UTF-8: bytes of a name that
    are not UTF-8 (Linux allows them) are shown as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
