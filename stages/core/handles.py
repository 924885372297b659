"""HDF5 handles across ``fork``: a forked child (finetune's loader workers, train-svm's fits) inherits the parent's
open files. It must neither use them nor close them: closing one runs HDF5's close of the parent's file from a
copy of its state (and flock locks are shared with the parent's open file). No torch here: proposal workers
import it."""
from __future__ import annotations

_INHERITED_HANDLES: list = []


def keep_inherited_handles(handles) -> None:
    """In a forked child, keep the HDF5 handles it inherited alive, never used and never closed. Call before
    dropping the references that would close them."""
    _INHERITED_HANDLES.extend(handle for handle in handles if handle is not None)
