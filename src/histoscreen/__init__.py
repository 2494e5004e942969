"""histoscreen: screen breast histopathology patches for invasive ductal carcinoma (IDC)."""

__version__ = "0.1.0"


class HistoscreenError(Exception):
    """A problem with the user's input or request, reported as one clear line."""
