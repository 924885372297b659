"""Stage ``spp proposals``: selective-search windows for every image of a split, cached in HDF5, resumable.

Reads: the split's images and annotations (``VocDataset``), or a file of precomputed boxes (``--boxes-file``).
Writes: ``01_proposals/<split>/proposals.h5`` and ``MANIFEST.json`` (last) with recall@0.5/0.7 and speed.

The ``proposals.h5`` layout (its reader ``ProposalStore`` and writer ``ProposalWriter``) and selective search
itself (fast mode, the paper's setting, with its ranking and filters) live in ``core/proposals.py``; this stage
runs it over a split in worker processes, journals the results and measures recall.

Precomputed boxes (``boxes_file``): ``.h5`` with ``boxes/<image_id>`` in sppnet's convention (e.g. another run's
``proposals.h5``); ``.npz`` mapping image id -> [N, 4] VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]``;
``.mat`` in the R-CNN/SPP layout (``images`` and ``boxes`` cells, boxes ``[y1 x1 y2 x2]`` 1-based inclusive;
MATLAB v7 files, read with scipy). The same clipping, min-side, duplicate and max-boxes filters apply.

Resuming: each image's boxes go to ``partial/<image_id>.npy`` (atomic write) the moment a worker returns them;
``partial/params.json`` says which parameters they were computed with. When every image is done the partial
files are consolidated into ``proposals.h5`` (temp file + rename) and removed. A killed run therefore leaves
complete per-image files only, and a rerun computes only the images missing from ``partial/`` and from an
existing ``proposals.h5`` made with the same parameters.

torchrun (as ``spp extract-features``): rank r of W computes the images ``r::W`` into the one journal, then writes
``partial/rank<r>-of-<W>.json``; rank 0 polls until every other rank's file is there and consolidates all of
them into the single ``proposals.h5`` and the manifest, so readers see one file whatever the process count.
Polling rather than a ``torch.distributed`` barrier, for the same reason (a resumed rank may finish hours early).
With ``proposals.workers = 0`` (all cores) each rank takes its share of the machine's cores.

The code: this package's ``__init__`` is the stage (``run``, reading precomputed boxes, consolidating into
``proposals.h5``, recall); ``worker.py`` runs selective search in worker processes; ``journal.py`` keeps the
per-image results of an unfinished run and finds what an earlier ``proposals.h5`` already holds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from ..core.artifacts import Run, StageResult, sha256_file
from ..core.config import ProposalConfig
from ..core.errors import InputError
from ..core.launch import launch_id, local_processes, process_shard, wait_for_files
from ..core.logs import progress as progress_bar
from ..core.proposals import (SCHEMA, SS_COLOUR_SPACES, SS_RANKING, SS_STRATEGIES, ProposalWriter, best_overlaps,
                              filter_boxes, read_boxes_group)
from ..core.runner import Produced, StagePlan, execute
from ..core.voc import Annotation, VocDataset, voc_to_boxes
from .journal import _Journal, _previous_output, _readable
from .worker import _map_images, _propose_one

OUTPUT_NAME = "proposals.h5"
PARTIAL_DIR = "partial"
METHOD_SS = "selective_search_fast"
METHOD_FILE = "boxes_file"
RECALL_IOUS = (0.5, 0.7)
log = logging.getLogger(__name__)

__all__ = ["run", "read_boxes_file", "recall_metrics", "format_summary", "_propose_one"]


# -- precomputed boxes -----------------------------------------------------------------------------------------------
def read_boxes_file(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    """Boxes of ``image_ids`` from a precomputed file (see the module doc), float64 [N, 4] in sppnet's convention.
    A missing image, a malformed array or an unknown format is a one-line InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError("missing boxes file", path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        raw = read_boxes_group(path, image_ids)
    elif suffix == ".npz":
        raw = _read_npz_boxes(path, image_ids)
    elif suffix == ".mat":
        raw = _read_mat_boxes(path, image_ids)
    else:
        raise InputError(f"unknown boxes file type {suffix!r} (use .h5, .npz or .mat)", path)
    missing = [image_id for image_id in image_ids if image_id not in raw]
    if missing:
        raise InputError(f"no boxes for image {missing[0]!r} ({len(missing)} of the split's {len(image_ids)} "
                         "images are missing)", path)
    out = {}
    for image_id in image_ids:
        array = np.asarray(raw[image_id])
        if array.size == 0:
            array = array.reshape(0, 4)
        if array.ndim != 2 or array.shape[1] != 4 or not np.issubdtype(array.dtype, np.number):
            raise InputError(f"boxes of image {image_id!r} have shape {array.shape}, expected [N, 4] numbers", path)
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise InputError(f"boxes of image {image_id!r} contain non-finite numbers", path)
        out[image_id] = array
    return out


def _read_npz_boxes(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            wanted = set(npz.files) & set(image_ids)
            raw = {image_id: npz[image_id] for image_id in wanted}
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable .npz ({exc})", path) from None
    # VOC 1-based inclusive [xmin, ymin, xmax, ymax] -> sppnet's convention; shape is checked by the caller.
    return {k: voc_to_boxes(v) if np.asarray(v).ndim == 2 and np.asarray(v).shape[1:] == (4,) else v
            for k, v in raw.items()}


def _read_mat_boxes(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError:  # scipy comes with scikit-learn; this only guards a stripped install
        raise InputError(".mat boxes need scipy (pip install scipy)", path) from None
    try:
        mat = loadmat(path, simplify_cells=True)
    except NotImplementedError:
        raise InputError("MATLAB v7.3 .mat files are not supported; re-save with save(..., '-v7')", path) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable .mat ({exc})", path) from None
    if "images" not in mat or "boxes" not in mat:
        raise InputError("expected the R-CNN layout: variables 'images' and 'boxes'", path)
    names = np.atleast_1d(mat["images"])
    cells = mat["boxes"]
    if not isinstance(cells, (list, tuple)) and not (isinstance(cells, np.ndarray) and cells.dtype == object):
        cells = [cells]  # squeeze_me turned a one-image cell array into its only [N, 4] array
    if len(names) != len(cells):
        raise InputError(f"'images' has {len(names)} entries but 'boxes' has {len(cells)}", path)
    out = {}
    for name, cell in zip(names, cells):
        array = np.asarray(cell, dtype=np.float64)
        if array.size == 0:
            array = array.reshape(0, 4)
        if array.ndim == 1 and array.shape[0] == 4:
            array = array.reshape(1, 4)  # simplify_cells squeezes a single box
        if array.ndim == 2 and array.shape[1] == 4:
            array = voc_to_boxes(array[:, [1, 0, 3, 2]])  # [y1 x1 y2 x2] 1-based -> sppnet
        out[str(name)] = array
    return out


# -- metrics ---------------------------------------------------------------------------------------------------------
def recall_metrics(best: np.ndarray, difficult: np.ndarray, thresholds: Iterable[float] = RECALL_IOUS) -> dict:
    """Recall (fraction of GT boxes with a proposal of IoU >= t) over non-difficult GT and over all GT, and the
    mean best overlap (MABO) of the non-difficult GT."""
    best = np.asarray(best, dtype=np.float64)
    easy = ~np.asarray(difficult, dtype=bool)
    out: dict = {"gt_boxes": int(easy.sum()), "gt_boxes_all": int(len(best))}
    for t in thresholds:
        out[f"recall@{t}"] = float((best[easy] >= t).mean()) if easy.any() else None
        out[f"recall@{t}_all"] = float((best >= t).mean()) if len(best) else None
    out["mabo"] = float(best[easy].mean()) if easy.any() else None
    return out


# -- the stage -------------------------------------------------------------------------------------------------------
def _params(cfg, boxes_file: Path | None) -> dict:
    """Everything the stored boxes depend on (not the worker count): decides whether old results are reusable."""
    common = {"schema": SCHEMA, "min_side": cfg.proposals.min_side, "max_boxes": cfg.proposals.max_boxes}
    if cfg.proposals.min_side_applies_to != "both":  # recorded only when not "both", the only filter before the
        # option existed, so proposals made then stay valid
        common["min_side_applies_to"] = cfg.proposals.min_side_applies_to
    if boxes_file is not None:
        return {"method": METHOD_FILE, "boxes_file": str(boxes_file.resolve()), "sha256": sha256_file(boxes_file),
                **common}
    import cv2

    return {"method": METHOD_SS, "ks": list(cfg.proposals.ks), "sigma": cfg.proposals.sigma,
            "max_image_side": cfg.proposals.max_image_side, "seed": cfg.seed, "opencv": cv2.__version__,
            "colour_spaces": list(SS_COLOUR_SPACES), "strategies": list(SS_STRATEGIES), "ranking": SS_RANKING,
            **common}


def run(cfg, split: str, boxes_file: Path | None = None) -> StageResult:
    """Compute (or import) the proposals of ``split`` into ``01_proposals/<split>/proposals.h5``."""
    run_dir = Run(cfg.run_dir)
    rank, world = process_shard()
    dataset = VocDataset.from_config(cfg.data)
    if boxes_file is not None and not Path(boxes_file).exists():
        raise InputError("missing boxes file", boxes_file)
    params = _params(cfg, Path(boxes_file) if boxes_file else None)
    section = {k: v for k, v in cfg.section("proposals").items() if k != "workers"}  # workers: speed only
    config = {"proposals": section, "seed": cfg.seed, "source": params,
              "data": {"dataset": cfg.data.dataset, "skip_bad": cfg.data.skip_bad}}
    inputs = {"dataset": dataset.fingerprint(split)}
    plan = StagePlan("proposals", split, config, inputs, {"proposals": OUTPUT_NAME})

    def propose(folder: Path) -> Produced:
        if boxes_file is not None and rank != 0:
            return Produced({}, summary=f"proposals {split} rank {rank}/{world}: rank 0 imports the boxes file",
                            write_manifest=False)
        annotations = {a.image_id: a for a in dataset.annotations(split)}  # bad ones warned and left out (skip_bad)
        if boxes_file is not None:
            stats = _import_boxes(Path(boxes_file), annotations, cfg.proposals, folder, params, split)
        else:
            stats = _compute_boxes(dataset, annotations, cfg, folder, params, split, rank, world)
            if isinstance(stats, Produced):  # a torchrun rank other than 0: its share is in the journal
                return stats
        kept_ids = stats.pop("kept_ids")
        return Produced({**stats.pop("metrics"), **stats, "images": len(kept_ids),
                         "images_skipped": len(dataset.image_ids(split)) - len(kept_ids)})  # bad annotation/image

    return execute(run_dir, plan, propose, describe=lambda metrics: format_summary(split, metrics), cfg=cfg,
                   verify=lambda manifest: _readable(manifest.output("proposals")),  # truncated: not up to date
                   lock_name=f".lock.rank{rank}" if rank else ".lock")  # rank 0 meets a plain run


def _compute_boxes(dataset: VocDataset, annotations: dict[str, Annotation], cfg, folder: Path, params: dict,
                   split: str, rank: int = 0, world: int = 1) -> dict | Produced:
    """Selective search over the images not done yet (rank r of W: the images ``r::W``), then, on rank 0, one
    ``proposals.h5``. A rank other than 0 returns its (manifest-less) ``Produced`` once its share is journaled."""
    output = folder / OUTPUT_NAME
    journal = _Journal(folder / PARTIAL_DIR, params, shared=world > 1)
    previous = _previous_output(output, params)
    reused_ids = set(previous.image_ids) if previous is not None else set()
    done = journal.done_ids() | reused_ids
    todo = [image_id for image_id in list(annotations)[rank::world] if image_id not in done]
    failed: dict[str, str] = {}
    workers = cfg.proposals.workers or max(1, (os.cpu_count() or 1) // local_processes())
    workers = max(1, min(workers, len(todo)))
    compute_s = cpu_s = 0.0
    if todo:
        start = time.perf_counter()
        results = contextlib.closing(_map_images(dataset, cfg, todo, workers))  # closing stops the pool
        progress = progress_bar(total=len(todo), unit="img", dynamic_ncols=True, desc=f"proposals {split}"
                                + (f" rank {rank}/{world}" if world > 1 else ""))
        with results as stream, progress as bar:
            for image_id, boxes, error, image_cpu_s in stream:
                cpu_s += image_cpu_s
                if error is not None:
                    if not dataset.skip_bad:
                        raise InputError(error)
                    warnings.warn(f"skipping: {error}", stacklevel=2)
                    failed[image_id] = error
                else:
                    journal.write(image_id, boxes)
                bar.update(1)
        compute_s = time.perf_counter() - start
    computed = len(todo) - len(failed)
    if world > 1:
        mine = {"params": params, "launch": launch_id(), "failed": failed, "images_computed": computed,
                "workers": workers, "compute_s": compute_s, "cpu_s": cpu_s}
        if rank != 0:
            if previous is not None:
                previous.close()  # before rank 0 replaces the file
            journal.write_rank_done(rank, world, mine)
            speed = f"{computed / compute_s:.2f} images/s" if computed and compute_s > 0 else "nothing computed"
            return Produced({}, summary=f"proposals {split} rank {rank}/{world}: {computed} image(s) computed "
                            f"({speed}), {len(failed)} skipped; rank 0 writes {OUTPUT_NAME} and the manifest",
                            write_manifest=False)
        shares = [mine] + _wait_for_ranks(journal, world, params)
        for share in shares[1:]:
            failed.update(share["failed"])
        computed = sum(share["images_computed"] for share in shares)
        workers = sum(share["workers"] for share in shares)
        compute_s = max(share["compute_s"] for share in shares)  # the ranks ran side by side
        cpu_s = sum(share["cpu_s"] for share in shares)
    kept = [image_id for image_id in annotations if image_id not in failed]

    def boxes_of(image_id: str) -> np.ndarray:
        return previous.boxes(image_id) if image_id in reused_ids else journal.read(image_id)

    tmp, metrics = _consolidate(output, split, params, kept, annotations, boxes_of)
    if previous is not None:
        previous.close()  # before the rename replaces the file it reads
    os.replace(tmp, output)
    journal.remove()
    return {"metrics": metrics, "kept_ids": kept, "workers": workers, "images_computed": computed,
            "images_reused": len(kept) - computed, "images_skipped": len(failed),
            "compute_s": round(compute_s, 3),
            "images_per_s": round(computed / compute_s, 4) if computed and compute_s > 0 else None,
            # Load-independent cost: CPU seconds per computed image, summed over the worker processes.
            "cpu_s_per_image": round(cpu_s / computed, 4) if computed else None}


def _wait_for_ranks(journal: _Journal, world: int, params: dict) -> list[dict]:
    """Rank 0: the records of ranks 1..W-1, once each has journaled its share (in this launch)."""
    launch = launch_id()
    paths = {journal.rank_path(r, world): r for r in range(1, world)}
    wait_for_files(list(paths), lambda path: journal.rank_done(paths[path], world, params, launch) is not None,
                   on_wait=lambda pending: log.info("rank 0: waiting for %s", ", ".join(p.name for p in pending)))
    return [journal.rank_done(r, world, params, launch) for r in range(1, world)]


def _import_boxes(path: Path, annotations: dict[str, Annotation], params_cfg: ProposalConfig, folder: Path,
                  params: dict, split: str) -> dict:
    start = time.perf_counter()
    raw = read_boxes_file(path, list(annotations))
    kept = list(annotations)

    def boxes_of(image_id: str) -> np.ndarray:
        ann = annotations[image_id]
        return filter_boxes(raw[image_id], ann.width, ann.height, params_cfg.min_side, params_cfg.max_boxes,
                            params_cfg.min_side_applies_to)

    tmp, metrics = _consolidate(folder / OUTPUT_NAME, split, params, kept, annotations, boxes_of)
    os.replace(tmp, folder / OUTPUT_NAME)
    input_boxes = sum(len(b) for b in raw.values())
    return {"metrics": metrics, "kept_ids": kept, "workers": 1, "images_computed": 0, "images_reused": 0,
            "images_skipped": 0, "input_boxes": input_boxes, "compute_s": round(time.perf_counter() - start, 3),
            "images_per_s": None, "cpu_s_per_image": None}


def _consolidate(output: Path, split: str, params: dict, image_ids: list[str], annotations: dict[str, Annotation],
                 boxes_of) -> tuple[Path, dict]:
    """Write a complete temp file for ``output`` from ``boxes_of(image_id)``, measuring recall on the way; the
    caller renames it over ``output`` (so a reader never sees a half-written file)."""
    tmp = output.with_name(f".{output.name}.tmp")
    counts, best, difficult, empty = [], [], [], []
    try:
        with ProposalWriter(tmp, split, params, image_ids) as writer:
            for image_id in image_ids:
                ann = annotations[image_id]
                boxes = writer.add(image_id, boxes_of(image_id), ann.width, ann.height)
                counts.append(len(boxes))
                if not len(boxes):
                    empty.append(image_id)
                best.append(best_overlaps(ann.boxes, boxes))
                difficult.append(np.asarray(ann.difficult, dtype=bool))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if empty:
        warnings.warn(f"{len(empty)} image(s) have no proposals (first: {empty[0]!r}); they are kept with none",
                      stacklevel=3)
    counts_arr = np.array(counts, dtype=np.float64)
    metrics = recall_metrics(np.concatenate(best) if best else np.zeros(0),
                             np.concatenate(difficult) if difficult else np.zeros(0, bool))
    metrics.update(boxes_per_image_mean=float(counts_arr.mean()) if len(counts) else 0.0,
                   boxes_per_image_median=float(np.median(counts_arr)) if len(counts) else 0.0,
                   boxes_per_image_min=int(counts_arr.min()) if len(counts) else 0,
                   boxes_per_image_max=int(counts_arr.max()) if len(counts) else 0,
                   images_without_proposals=len(empty))
    return tmp, metrics


def format_summary(split: str, metrics: dict) -> str:
    def pct(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{100 * value:.1f}%"

    speed = metrics.get("images_per_s")
    lines = [
        f"proposals {split}: {metrics.get('images', 0)} images, boxes/image mean "
        f"{metrics.get('boxes_per_image_mean', 0):.0f} median {metrics.get('boxes_per_image_median', 0):.0f}",
        f"  recall@0.5 {pct('recall@0.5')}  recall@0.7 {pct('recall@0.7')}  (non-difficult GT: "
        f"{metrics.get('gt_boxes', 0)}; all GT: @0.5 {pct('recall@0.5_all')} @0.7 {pct('recall@0.7_all')})",
        f"  computed {metrics.get('images_computed', 0)}, reused {metrics.get('images_reused', 0)}, "
        f"skipped {metrics.get('images_skipped', 0)}; "
        + (f"{speed:.2f} images/s with {metrics.get('workers')} worker(s), "
           f"{metrics.get('cpu_s_per_image'):.2f} CPU s/image" if speed else "nothing computed"),
    ]
    return "\n".join(lines)
