"""How long-running work reports progress without printing anything itself.

Library functions take a `progress` callable and call it as work advances; the CLI passes
one that draws a bar (or nothing, with --quiet), tests and the web app pass their own.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None:
        """`done` of `total` units of `stage` are finished."""


def silent(stage: str, done: int, total: int) -> None:
    """A Progress that reports nothing."""
