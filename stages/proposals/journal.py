"""``spp proposals``, what a rerun can reuse: ``_Journal``, the per-image results of an unfinished run
(``partial/<image_id>.npy``, valid for the parameters in ``partial/params.json``), and an existing
``proposals.h5`` made with the same parameters (``_previous_output``).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from ..core.artifacts import atomic_write_bytes, atomic_write_json
from ..core.errors import SppError
from ..core.proposals import ProposalStore


# -- the resumable per-image journal -------------------------------------------------------------------------------
class _Journal:
    """``partial/<image_id>.npy`` per finished image, valid for the parameters in ``partial/params.json``."""

    def __init__(self, folder: Path, params: dict):
        self.folder = folder
        params_path = folder / "params.json"
        try:
            same = json.loads(params_path.read_text()) == params
        except (OSError, ValueError):
            same = False
        if not same and folder.exists():
            shutil.rmtree(folder)  # computed with other parameters: useless now
        folder.mkdir(parents=True, exist_ok=True)
        if not same:
            atomic_write_json(params_path, params)
        for stale in folder.glob(".*.tmp"):  # an atomic write that was killed before its rename
            stale.unlink(missing_ok=True)

    def done_ids(self) -> set[str]:
        return {path.stem for path in self.folder.glob("*.npy")}

    def write(self, image_id: str, boxes: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        atomic_write_bytes(self.folder / f"{image_id}.npy", buffer.getvalue())

    def read(self, image_id: str) -> np.ndarray:
        path = self.folder / f"{image_id}.npy"
        try:
            return np.load(path, allow_pickle=False).reshape(-1, 4)
        except (OSError, ValueError) as exc:
            raise SppError(f"unreadable partial result ({exc}); delete it and rerun", path) from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _readable(path: Path) -> bool:
    try:
        ProposalStore(path).close()
    except SppError:
        return False
    return True


def _previous_output(path: Path, params: dict) -> "ProposalStore | None":
    """An existing ``proposals.h5`` made with the same parameters (its images need no recomputing)."""
    if not path.exists():
        return None
    try:
        store = ProposalStore(path)
    except SppError:
        return None
    if store.params != params:
        store.close()
        return None
    return store
