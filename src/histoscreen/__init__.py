"""histoscreen: screen breast histopathology patches for invasive ductal carcinoma (IDC)."""

__version__ = "0.1.0"

from histoscreen.errors import HistoscreenError  # noqa: E402  (re-exported: the one error type to catch)

__all__ = ["HistoscreenError", "__version__"]
