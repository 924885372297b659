"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 1."""
from __future__ import annotations

from pathlib import Path


class SppError(Exception):
    """A user-facing error. ``str(err)`` is one line that names the file (when there is one) and the problem."""

    def __init__(self, message: str, path: str | Path | None = None):
        message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if path is not None else message)


class InputError(SppError):
    """Bad input data: an image, an annotation, a split list, a detections file."""


class StageInputMissing(SppError):
    """An upstream stage has not run (no manifest) or its output changed since; names the command to run."""
