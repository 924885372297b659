"""Stage ``spp proposals``: selective-search windows for every image of a split, cached in HDF5, resumable.

Reads: the split's images and annotations (``VocDataset``), or a file of precomputed boxes (``--boxes-file``).
Writes: ``01_proposals/<split>/proposals.h5`` and ``MANIFEST.json`` (last) with recall@0.5/0.7 and speed.

``proposals.h5`` layout (schema 1): ``image_ids`` (utf-8 strings, split order), ``boxes/<image_id>`` float32 [N, 4]
in sppnet's convention (0-based ``[x1, y1, x2, y2)``, see ``core/boxes.py``) with ``width``/``height`` attributes,
and file attributes ``schema``, ``split``, ``method`` and ``params`` (JSON of everything the boxes depend on).
Boxes are in selective search's rank order. An image without proposals is an empty [0, 4] dataset.

Selective search, fast mode (SPEC §3; R-CNN ``selective_search/selective_search_boxes.m``), built by hand from
OpenCV contrib's pieces because ``switchToSelectiveSearchFast`` is not the paper's setting: it segments with
k in {150, 300, 450} at GraphSegmentation's default min_size 100. Here, as in the SS code:
- colour spaces HSV and Lab, 8-bit, converted as OpenCV's fast mode does (``COLOR_RGB2HSV``: hue in 0..179;
  ``COLOR_RGB2Lab``). The SS code's ``im2uint8(rgb2hsv)`` spans hue over 0..255 (``COLOR_RGB2HSV_FULL``); on the
  500 VOC07 val images that gave 0.6-1.4 points lower recall with OpenCV's implementation, so OpenCV's is used;
- Felzenszwalb segmentations with k in ``proposals.ks`` (50, 100), min_size = k, sigma ``proposals.sigma``;
- strategies ColourTextureSizeFill and TextureSizeFill (OpenCV's ``Multiple`` averages the similarities with equal
  weights, which ranks merges exactly like the SS code's sum). Like OpenCV's fast mode, the two strategies share
  their fill/texture/size objects, so texture histograms are computed once per segmentation.
- Ranking: the SS paper ranks the regions of each hierarchy by ``RND * i`` ascending, with i = 1 at the top of the
  hierarchy (the whole image), so large regions tend to come first. OpenCV ranks by ``rand() * level`` ascending,
  level 1 being an initial segment, i.e. small regions first (its source comment: "inverted from the paper"), then
  removes duplicates. We reverse OpenCV's order, which restores the paper's direction (top of each hierarchy first,
  randomised). On VOC07 val with the 2000-box cap this gave recall@0.7 0.609 instead of 0.562 (@0.5 0.877 vs
  0.870). C ``rand()`` is re-seeded per image from ``seed`` and the image id, so results are reproducible and do
  not depend on the worker count or on which images a worker handled before.
- Filter: a box is dropped when it is narrower than ``proposals.min_side`` (20 px), SPEC §3's wording; with
  ``proposals.min_side_applies_to=both`` also when it is shorter, as R-CNN's ``FilterBoxesWidth`` does
  (``nr >= minLen & nc >= minLen``). On the 500 VOC07 val images, uncapped: width only 2,709 boxes per image,
  recall@0.5 0.907; both sides 2,078, 0.889 (the thin boxes catch small objects).
  Then duplicates are removed (first kept) and at most ``proposals.max_boxes`` are kept, in rank order (default
  0: all, as the released code; capped at 2,000 the width-only boxes give 0.877).
- ``proposals.max_image_side`` > 0 runs SS on the image shrunk so its longest side is that many pixels and maps
  the boxes back (``k``/``min_size`` stay in shrunk pixels). VOC images are at most 500 px, so 500 is a no-op there;
  300 costs recall (100 VOC07 val images: recall@0.5 0.834 -> 0.788, @0.7 0.585 -> 0.541) for 4x less CPU.

Precomputed boxes (``boxes_file``): ``.h5`` with ``boxes/<image_id>`` in sppnet's convention (e.g. another run's
``proposals.h5``); ``.npz`` mapping image id -> [N, 4] VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]``;
``.mat`` in the R-CNN/SPP layout (``images`` and ``boxes`` cells, boxes ``[y1 x1 y2 x2]`` 1-based inclusive;
MATLAB v7 files, read with scipy). The same clipping, min-side, duplicate and max-boxes filters apply.

Resuming: each image's boxes go to ``partial/<image_id>.npy`` (atomic write) the moment a worker returns them;
``partial/params.json`` says which parameters they were computed with. When every image is done the partial
files are consolidated into ``proposals.h5`` (temp file + rename) and removed. A killed run therefore leaves
complete per-image files only, and a rerun computes only the images missing from ``partial/`` and from an
existing ``proposals.h5`` made with the same parameters.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import multiprocessing
import os
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from .core.artifacts import Run, StageResult, atomic_write_bytes, atomic_write_json, read_manifest, sha256_file
from .core.config import CHOICES, ProposalConfig
from .core.errors import InputError, SppError, require_free_space
from .core.handles import keep_inherited_handles
from .core.voc import Annotation, VocDataset, resolve_voc_root, voc_to_boxes

SCHEMA = 1
OUTPUT_NAME = "proposals.h5"
PARTIAL_DIR = "partial"
METHOD_SS = "selective_search_fast"
METHOD_FILE = "boxes_file"
RECALL_IOUS = (0.5, 0.7)
# Descriptive, recorded with the parameters: changing any of these must not reuse old per-image results.
SS_COLOUR_SPACES = ("hsv", "lab")
SS_RANKING = "top_first"  # OpenCV's order reversed (see the module doc)
SS_STRATEGIES = ("colour+texture+size+fill", "texture+size+fill")


# -- selective search on one image ----------------------------------------------------------------------------
def _seed_c_rand(seed: int) -> None:
    """Seed libc's ``rand()``, which OpenCV's selective search uses to rank regions (see the module doc)."""
    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(seed & 0xFFFFFFFF))
    except (OSError, AttributeError):  # no libc symbols (e.g. Windows): the ranking is then not reproducible
        warnings.warn("cannot seed C rand(): selective-search ranking will vary between runs", stacklevel=2)


def image_seed(seed: int, image_id: str) -> int:
    """The per-image seed of the SS ranking: independent of worker count and processing order."""
    return zlib.crc32(f"{seed}:{image_id}".encode())


def rects_to_boxes(rects: np.ndarray) -> np.ndarray:
    """OpenCV rects ``(x, y, w, h)`` covering pixels x..x+w-1 -> ``[x, y, x+w, y+h)`` float64."""
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def raw_selective_search(image: np.ndarray, ks: Iterable[int], sigma: float, seed: int = 0) -> np.ndarray:
    """Selective search fast mode on an RGB uint8 image: float64 [N, 4] distinct boxes, unfiltered, in rank order
    (OpenCV's order reversed: top of each hierarchy first, as in the SS paper)."""
    import cv2

    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_RGB2Lab))
    for k in ks:
        ss.addGraphSegmentation(seg.createGraphSegmentation(sigma=float(sigma), k=float(k), min_size=int(k)))
    colour = seg.createSelectiveSearchSegmentationStrategyColor()
    fill = seg.createSelectiveSearchSegmentationStrategyFill()
    texture = seg.createSelectiveSearchSegmentationStrategyTexture()
    size = seg.createSelectiveSearchSegmentationStrategySize()
    # Same argument order as OpenCV's fast mode, so the float sums (and their ties) are the same.
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(colour, fill, texture, size))
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(fill, texture, size))
    _seed_c_rand(seed)
    rects = ss.process()
    return rects_to_boxes(rects if rects is not None else np.zeros((0, 4)))[::-1].copy()


def filter_boxes(boxes: np.ndarray, width: int, height: int, min_side: float, max_boxes: int,
                 min_side_applies_to: str = "both") -> np.ndarray:
    """Clip to the image, drop empty boxes and boxes with width or height < ``min_side`` (only width with
    ``min_side_applies_to="width"``), drop duplicates (the first is kept), keep the first ``max_boxes`` (0 = all).
    The order of the survivors is kept."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if min_side_applies_to not in CHOICES["proposals.min_side_applies_to"]:
        raise ValueError(f"min_side_applies_to must be 'both' or 'width', got {min_side_applies_to!r}")
    big_enough = (widths >= min_side) & ((heights >= min_side) if min_side_applies_to == "both" else True)
    boxes = boxes[(widths > 0) & (heights > 0) & big_enough]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return boxes[:max_boxes] if max_boxes > 0 else boxes


def selective_search(image: np.ndarray, params: ProposalConfig, seed: int = 0) -> np.ndarray:
    """Proposals for one RGB uint8 image [H, W, 3]: float64 [N, 4] in sppnet's convention, rank order, filtered
    and capped as configured (``params``: ``ks``, ``sigma``, ``min_side``, ``max_boxes``, ``max_image_side``).
    Uses C ``rand()``: not thread-safe against another thread running selective search at the same time."""
    import cv2

    height, width = image.shape[:2]
    longest = max(height, width)
    if params.max_image_side > 0 and longest > params.max_image_side:
        factor = params.max_image_side / longest
        small_w, small_h = max(1, round(width * factor)), max(1, round(height * factor))
        small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        boxes = raw_selective_search(small, params.ks, params.sigma, seed)
        # Pixel edges map to pixel edges; multiply first so that the image border maps back exactly.
        boxes[:, 0::2] = boxes[:, 0::2] * width / small_w
        boxes[:, 1::2] = boxes[:, 1::2] * height / small_h
    else:
        boxes = raw_selective_search(image, params.ks, params.sigma, seed)
    return filter_boxes(boxes, width, height, params.min_side, params.max_boxes, params.min_side_applies_to)


# -- worker side --------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(devkit_root: str, params: ProposalConfig, seed: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per worker process: the pool provides the parallelism
    _WORKER.update(dataset=VocDataset(devkit_root), params=params, seed=seed)


def _propose_one(image_id: str) -> tuple[str, np.ndarray | None, str | None, float]:
    """Worker task: (image_id, boxes float32 [N, 4] or None, error message or None, CPU seconds it took).
    CPU time, unlike wall time, does not grow when other processes share the cores."""
    import cv2

    start = time.process_time()
    try:
        image = _WORKER["dataset"].load_image(image_id)
        boxes = selective_search(image, _WORKER["params"], image_seed(_WORKER["seed"], image_id))
    except SppError as err:
        return image_id, None, str(err), time.process_time() - start
    except cv2.error as err:
        path = _WORKER["dataset"].image_path(image_id)
        return image_id, None, f"{path}: selective search failed ({' '.join(str(err).split())})", 0.0
    return image_id, boxes.astype(np.float32), None, time.process_time() - start


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


# -- precomputed boxes -----------------------------------------------------------------------------------------------
def read_boxes_file(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    """Boxes of ``image_ids`` from a precomputed file (see the module doc), float64 [N, 4] in sppnet's convention.
    A missing image, a malformed array or an unknown format is a one-line InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError("missing boxes file", path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        raw = _read_h5_boxes(path, image_ids)
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


def _read_h5_boxes(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    try:
        with h5py.File(path, "r") as handle:
            group = handle.get("boxes")
            if not isinstance(group, h5py.Group):
                raise InputError("no 'boxes' group (expected boxes/<image_id> datasets)", path)
            return {image_id: group[image_id][()] for image_id in image_ids if image_id in group}
    except OSError as exc:
        raise InputError(f"unreadable HDF5 ({exc})", path) from None


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
def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """For each GT box, the highest IoU any proposal reaches (0 without proposals), float64 [G]."""
    from .core.boxes import box_iou

    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    proposals = np.ascontiguousarray(proposals, dtype=np.float64).reshape(-1, 4)
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return np.zeros(len(gt_boxes), dtype=np.float64)
    return box_iou(gt_boxes, proposals).max(axis=1)


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
    dataset = VocDataset(resolve_voc_root(cfg.data.dataset, cfg.data.voc_root), skip_bad=cfg.data.skip_bad)
    if boxes_file is not None and not Path(boxes_file).exists():
        raise InputError("missing boxes file", boxes_file)
    params = _params(cfg, Path(boxes_file) if boxes_file else None)
    section = {k: v for k, v in cfg.section("proposals").items() if k != "workers"}  # workers: speed only
    config = {"proposals": section, "seed": cfg.seed, "source": params,
              "data": {"dataset": cfg.data.dataset, "skip_bad": cfg.data.skip_bad}}
    inputs = {"dataset": dataset.fingerprint(split)}
    if run_dir.is_up_to_date("proposals", split, config, inputs):
        manifest = read_manifest(run_dir.manifest_path("proposals", split))
        if _readable(manifest.output("proposals")):  # a deleted or truncated file is not up to date
            return StageResult(manifest, summary=format_summary(split, manifest.metrics), skipped=True)

    run_dir.invalidate("proposals", split)
    folder = run_dir.stage_dir("proposals", split)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    annotations = {a.image_id: a for a in dataset.annotations(split)}  # bad ones warned and left out (skip_bad)
    if boxes_file is not None:
        stats = _import_boxes(Path(boxes_file), annotations, cfg.proposals, folder, params, split)
    else:
        stats = _compute_boxes(dataset, annotations, cfg, folder, params, split)
    kept_ids = stats.pop("kept_ids")
    metrics = {**stats.pop("metrics"), **stats, "images": len(kept_ids),
               "images_skipped": len(dataset.image_ids(split)) - len(kept_ids)}  # bad annotation or image
    wall = time.perf_counter() - start
    manifest = run_dir.write_manifest("proposals", split, config=config, inputs=inputs,
                                      outputs={"proposals": OUTPUT_NAME}, metrics=metrics, wall_time_s=wall)
    return StageResult(manifest, summary=format_summary(split, metrics))


def _compute_boxes(dataset: VocDataset, annotations: dict[str, Annotation], cfg, folder: Path, params: dict,
                   split: str) -> dict:
    output = folder / OUTPUT_NAME
    journal = _Journal(folder / PARTIAL_DIR, params)
    previous = _previous_output(output, params)
    reused_ids = set(previous.image_ids) if previous is not None else set()
    done = journal.done_ids() | reused_ids
    todo = [image_id for image_id in annotations if image_id not in done]
    failed: set[str] = set()
    workers = cfg.proposals.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo)))
    compute_s = cpu_s = 0.0
    if todo:
        from tqdm import tqdm

        start = time.perf_counter()
        results = contextlib.closing(_map_images(dataset, cfg, todo, workers))  # closing stops the pool
        progress = tqdm(total=len(todo), unit="img", desc=f"proposals {split}", dynamic_ncols=True)
        with results as stream, progress as bar:
            for image_id, boxes, error, image_cpu_s in stream:
                cpu_s += image_cpu_s
                if error is not None:
                    if not dataset.skip_bad:
                        raise InputError(error)
                    warnings.warn(f"skipping: {error}", stacklevel=2)
                    failed.add(image_id)
                else:
                    journal.write(image_id, boxes)
                bar.update(1)
        compute_s = time.perf_counter() - start
    kept = [image_id for image_id in annotations if image_id not in failed]

    def boxes_of(image_id: str) -> np.ndarray:
        return previous.boxes(image_id) if image_id in reused_ids else journal.read(image_id)

    tmp, metrics = _consolidate(output, split, params, kept, annotations, boxes_of)
    if previous is not None:
        previous.close()  # before the rename replaces the file it reads
    os.replace(tmp, output)
    journal.remove()
    computed = len(todo) - len(failed)
    return {"metrics": metrics, "kept_ids": kept, "workers": workers, "images_computed": computed,
            "images_reused": len(kept) - computed, "images_skipped": len(failed),
            "compute_s": round(compute_s, 3),
            "images_per_s": round(computed / compute_s, 4) if computed and compute_s > 0 else None,
            # Load-independent cost: CPU seconds per computed image, summed over the worker processes.
            "cpu_s_per_image": round(cpu_s / computed, 4) if computed else None}


def _map_images(dataset: VocDataset, cfg, image_ids: list[str], workers: int) -> Iterator[tuple]:
    """Run ``_propose_one`` over ``image_ids``: in this process for one worker, else in a spawn pool (results in
    completion order). Leaving the generator early (an error, Ctrl-C) terminates the pool."""
    initargs = (str(dataset.devkit_root), cfg.proposals, cfg.seed)
    if workers == 1:
        import cv2

        threads = cv2.getNumThreads()
        _init_worker(*initargs)
        try:
            for image_id in image_ids:
                yield _propose_one(image_id)
        finally:
            cv2.setNumThreads(threads)
            _WORKER.clear()
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap_unordered(_propose_one, image_ids, chunksize=1)


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
        with h5py.File(tmp, "w") as handle:
            handle.attrs.update(schema=SCHEMA, split=split, method=params["method"], params=json.dumps(params),
                                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            handle.create_dataset("image_ids", data=np.array(image_ids, dtype=object), dtype=h5py.string_dtype())
            group = handle.create_group("boxes")
            for image_id in image_ids:
                boxes = np.asarray(boxes_of(image_id), dtype=np.float32).reshape(-1, 4)
                require_free_space(tmp, boxes.nbytes + 4096, f"the proposals of image {image_id}")
                ann = annotations[image_id]
                dataset = group.create_dataset(image_id, data=boxes, compression="gzip" if len(boxes) else None,
                                               shuffle=bool(len(boxes)))
                dataset.attrs.update(width=ann.width, height=ann.height)
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


# -- read side -------------------------------------------------------------------------------------------------------
class ProposalStore:
    """Read side of ``proposals.h5``: ``image_ids`` (split order) and ``boxes(image_id)`` -> float64 [N, 4].

    The HDF5 file is opened lazily and reopened in a forked child (h5py handles must not cross a fork)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as handle:
                schema = handle.attrs.get("schema")
                if schema != SCHEMA or "image_ids" not in handle or "boxes" not in handle:
                    raise SppError(f"not an sppnet proposals file of schema {SCHEMA}", self.path)
                self.image_ids: list[str] = list(handle["image_ids"].asstr()[()])
                self.split = str(handle.attrs.get("split", ""))
                self.method = str(handle.attrs.get("method", ""))
                self.params: dict = json.loads(handle.attrs.get("params", "{}"))
        except FileNotFoundError:
            raise SppError(f"missing proposals file; {self._rerun_hint()}", self.path) from None
        except (OSError, ValueError, KeyError) as exc:
            raise SppError(f"corrupt or truncated proposals file ({exc}); {self._rerun_hint()}", self.path) from None
        self._index = set(self.image_ids)
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def _rerun_hint(self) -> str:
        # The file lives in <run>/01_proposals/<split>/.
        return f"rerun `spp proposals --split {self.path.parent.name}` to rebuild it"

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            keep_inherited_handles([self._handle])  # a forked child neither uses nor closes the parent's handle
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def boxes(self, image_id: str) -> np.ndarray:
        if image_id not in self._index:
            raise InputError(f"no proposals for image {image_id!r}", self.path)
        return np.asarray(self._file()["boxes"][image_id][()], dtype=np.float64).reshape(-1, 4)

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) of the image the boxes were made for."""
        if image_id not in self._index:
            raise InputError(f"no proposals for image {image_id!r}", self.path)
        attrs = self._file()["boxes"][image_id].attrs
        return int(attrs["height"]), int(attrs["width"])

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> "ProposalStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # picklable (e.g. into DataLoader workers): without the open handle
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state


def load_proposals(run: Run, split: str) -> ProposalStore:
    """The finished, fresh proposals of ``split`` (one-line StageInputMissing naming the command otherwise)."""
    manifest = run.require("proposals", split)
    return ProposalStore(manifest.output("proposals"))


__all__ = ["ProposalStore", "load_proposals", "run", "selective_search", "raw_selective_search", "filter_boxes",
           "rects_to_boxes", "read_boxes_file", "best_overlaps", "recall_metrics", "image_seed", "format_summary"]
