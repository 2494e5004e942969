"""Package attributes imported on first use (PEP 562), so that importing a package for one
light name does not import torch for another: `histoscreen --help` and a short ONNX
`predict` would otherwise pay torch's second or more of start-up for nothing."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's `__getattr__` and `__dir__`: each name in `exports` is imported from the
    module named for it when first asked for, and kept on the package."""

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
