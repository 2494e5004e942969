"""The boundary checks of settings, one per kind of value, in the style of scikit-learn's
`check_array`: each takes the setting's Python name and the value given, and returns the
value in the type the code inside trusts, or raises `SettingError` in one phrasing, which
the command line rephrases with its flag and the web app answers as a 422.

NaN, infinities, booleans and strings never pass as numbers: `nan < 1` is False, so a
comparison alone lets NaN through, and `True` is an int to Python.

>>> whole_number("batch_size", 64)
64
>>> whole_number("batch_size", 0)
Traceback (most recent call last):
...
histoscreen.errors.SettingError: batch_size must be at least 1, got 0
>>> number("min_tissue", float("nan"), low=0, high=1, low_open=True)
Traceback (most recent call last):
...
histoscreen.errors.SettingError: min_tissue must be a finite number, got nan
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import TypeVar

from histoscreen.errors import SettingError

T = TypeVar("T")


def whole_number(setting: str, value: object, *, low: int = 1, high: int | None = None) -> int:
    """A whole number from `low` to `high` (inclusive)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SettingError(setting, f"must be a whole number, got {value!r}")
    if value < low:
        raise SettingError(setting, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise SettingError(setting, f"must be between {low} and {high}, got {value}")
    return int(value)


def number(setting: str, value: object, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within [low, high]; an open end excludes the bound itself."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise SettingError(setting, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise SettingError(setting, f"must be {_interval(low, high, low_open, high_open)}, got {value}")
    return float(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'above' if low_open else 'at least'} {low:g}"
    if low is None:
        return f"{'below' if high_open else 'at most'} {high:g}"
    if not (low_open or high_open):
        return f"between {low:g} and {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def choice(setting: str, value: T, choices: Iterable[T]) -> T:
    """One of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise SettingError(setting, f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value
