"""torchvision's compiled NMS and RoI pooling kernels without importing its Python package.

``import torchvision`` takes 2-3 s per process (``torchvision.ops`` imports ``torch._dynamo``), more than a
detection's start-up should; the kernels themselves live in one shared library that loads in milliseconds.
``op(name)`` loads that library on first use and returns ``torch.ops.torchvision.<name>``: the very kernel that
``torchvision.ops`` calls, so the results are the same to the bit. Where the library cannot be found this way
(another torchvision layout), it falls back to importing ``torchvision.ops``, which loads it its own way.
Autograd formulas are registered by the Python package only: callers that need gradients import it
(``spp._roi_pool_level``).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from typing import Callable

import torch

LIBRARY_NAMES = ("_C_stable", "_C")  # torchvision's extension module, newest name first


def op(name: str) -> Callable:
    """``torch.ops.torchvision.<name>`` (e.g. ``nms``, ``roi_pool``), its library loaded when first needed."""
    found = _registered(name)
    if found is None:
        _load_library()
        found = _registered(name)
    if found is None:
        import torchvision.ops  # noqa: F401 - the package's own loading, and its error if the kernels are missing

        found = getattr(torch.ops.torchvision, name)
    return found


def _registered(name: str) -> Callable | None:
    try:
        return getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return None


def _load_library() -> None:
    spec = importlib.util.find_spec("torchvision")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        return
    finder = importlib.machinery.FileFinder(str(Path(spec.origin).parent), (
        importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    for library in LIBRARY_NAMES:
        found = finder.find_spec(library)
        if found is not None and found.origin is not None:
            try:
                torch.ops.load_library(found.origin)
            except (OSError, RuntimeError):
                continue
            return
