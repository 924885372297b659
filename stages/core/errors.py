"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 1."""
from __future__ import annotations

import errno
import os
import re
import shutil
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


class DiskFull(SppError):
    """Not enough free space to write an output; raised before the write, so that nothing is half written."""


# HDF5 cannot recover from a write that failed for lack of space: closing the file afterwards (explicitly or at
# exit) can crash the process. Writers therefore check before writing, keeping this much space spare for the
# metadata HDF5 flushes at close. Overridable for tests and for filesystems whose free space is reported oddly.
DISK_MARGIN_BYTES = int(os.environ.get("SPP_DISK_MARGIN_MB", "256")) << 20


def require_free_space(path: str | Path, needed_bytes: int, what: str) -> None:
    """Raise ``DiskFull`` naming ``path`` if writing ``needed_bytes`` more there would leave less than
    ``DISK_MARGIN_BYTES`` free on its filesystem."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder tells the filesystem
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free - int(needed_bytes) < DISK_MARGIN_BYTES:
        raise DiskFull(f"not enough disk space for {what}: {_mib(needed_bytes)} to write, {_mib(free)} free, "
                       f"{_mib(DISK_MARGIN_BYTES)} kept spare; free some space and rerun the same command "
                       "(finished work is kept)", path)


def disk_full_message(exc: BaseException) -> str | None:
    """One line for an OS or HDF5 error that says the disk is full, else None."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f"{exc.filename}: " if exc.filename else ""
    elif "No space left on device" in text or "errno = 28" in text:
        found = re.search(r"filename = '([^']*)'", text)
        where = f"{found.group(1)}: " if found else ""
    else:
        return None
    return f"{where}no space left on device; free some space and rerun the same command (finished work is kept)"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MiB"
