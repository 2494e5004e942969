"""The errors histoscreen raises: one clear line each, typed so that every front end
(the command line, the web app, a Ray worker) can phrase them in its own terms.

Library messages speak of values, files and settings by their Python names; only the
CLI knows its flags, and rephrases `SettingError` and `OutputExistsError` with them.
"""

from __future__ import annotations

from pathlib import Path


class HistoscreenError(Exception):
    """A problem with the user's input or request, reported as one clear line."""


class InputError(HistoscreenError):
    """An input file or folder that cannot be used as given."""


class ModelError(HistoscreenError):
    """A model file or its metadata that is missing, unsafe or invalid."""


class SettingError(HistoscreenError):
    """A setting (function argument, command-line option) with an invalid value.

    `setting` is the Python parameter name (`batch_size`); the CLI maps it to its flag.
    """

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting} {problem}")


class ArgumentError(HistoscreenError, ValueError):
    """An argument of a Python function that does not fit: wrong length, type or range."""


class OutputExistsError(HistoscreenError):
    """An output that already exists and may only be replaced when asked to."""

    def __init__(self, path: Path | str, what: str = "output"):
        self.path = Path(path)
        super().__init__(f"{path} already exists; choose another {what} path or allow overwriting it")


class UnsafeOutputError(HistoscreenError):
    """An output that would overwrite or delete an input, or something histoscreen did not write."""


class RunExistsError(HistoscreenError):
    """A training folder that already holds a run: resume it or choose another folder."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        super().__init__(f"{path} holds a training run already; resume it or choose another folder")


class ResumeMismatchError(HistoscreenError):
    """A run asked to resume with settings other than those of the run it would continue."""
