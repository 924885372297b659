"""``spp proposals``, what a rerun can reuse: ``_Journal``, the per-image results of an unfinished run
(``partial/<image_id>.npy``, valid for the parameters in ``partial/params.json``), and an existing
``proposals.h5`` made with the same parameters (``_previous_output``).

Under torchrun every rank writes its images into the one journal (image ids are disjoint, writes atomic) and,
when its share is done, ``partial/rank<r>-of-<W>.json`` (its failed images and timings): rank 0 waits for those
files and consolidates. Because the journal is keyed by image id, an interrupted run resumes with any number
of processes.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from filelock import FileLock

from ..core.artifacts import atomic_write_bytes, atomic_write_json
from ..core.errors import SppError
from ..core.proposals import ProposalStore


# -- the resumable per-image journal -------------------------------------------------------------------------------
class _Journal:
    """``partial/<image_id>.npy`` per finished image, valid for the parameters in ``partial/params.json``."""

    def __init__(self, folder: Path, params: dict, shared: bool = False):
        """``shared``: torchrun ranks write into it at the same time; the first to arrive (under a lock beside
        the folder) clears a journal of other parameters, and nobody deletes temp files another rank may be
        writing (``remove`` takes them with the folder at the end)."""
        self.folder = folder
        with FileLock(str(folder.parent / f".{folder.name}.lock")) if shared else contextlib.nullcontext():
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
        if not shared:
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

    # -- torchrun ranks --------------------------------------------------------------------------------------------
    def rank_path(self, rank: int, world: int) -> Path:
        return self.folder / f"rank{rank}-of-{world}.json"

    def write_rank_done(self, rank: int, world: int, record: dict) -> None:
        """This rank's share is in the journal; ``record``: its failed images (id -> error) and timings."""
        atomic_write_json(self.rank_path(rank, world), {"rank": rank, "world_size": world, **record})

    def rank_done(self, rank: int, world: int, params: dict, launch: str | None) -> dict | None:
        """Rank ``rank``'s record once its share is done with these parameters (in this launch, when the launch
        has an id), else None."""
        try:
            record = json.loads(self.rank_path(rank, world).read_text())
        except (OSError, ValueError):
            return None
        if record.get("params") != params or (launch is not None and record.get("launch") != launch):
            return None
        return record


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
