"""JSON from files anyone can hand over: every way json.loads can fail becomes one line."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_text(text: str, source: Path, *, error: type[Exception], what: str) -> object:
    """Parse `text`, or raise `error` naming `source` and the problem: invalid JSON, an integer
    of more digits than Python converts (ValueError), or nesting deep enough to exhaust the
    stack (RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{source}: {what} is not valid JSON ({problem})") from None
    except ValueError as problem:
        raise error(f"{source}: {what} holds a number this reader refuses ({problem})") from None
    except RecursionError:
        raise error(f"{source}: {what} is nested too deeply to read") from None
