"""Region proposals: the ``proposals.h5`` file format (its one reader and one writer) and selective search.

``proposals.h5`` layout (schema 1): ``image_ids`` (utf-8 strings, split order), ``boxes/<image_id>`` float32 [N, 4]
in sppnet's convention (0-based ``[x1, y1, x2, y2)``, see ``boxes.py``) with ``width``/``height`` attributes,
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
"""
from __future__ import annotations

import ctypes
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .artifacts import Run
from .config import CHOICES, ProposalConfig
from .errors import InputError, SppError, require_free_space
from .registry import command_for_path
from .handles import keep_inherited_handles

SCHEMA = 1
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


# -- metrics ---------------------------------------------------------------------------------------------------------
def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """For each GT box, the highest IoU any proposal reaches (0 without proposals), float64 [G]."""
    from .boxes import box_iou  # here: boxes.py imports torch, which selective-search workers never need

    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    proposals = np.ascontiguousarray(proposals, dtype=np.float64).reshape(-1, 4)
    if len(proposals) == 0 or len(gt_boxes) == 0:
        return np.zeros(len(gt_boxes), dtype=np.float64)
    return box_iou(gt_boxes, proposals).max(axis=1)


# -- write side ------------------------------------------------------------------------------------------------------
class ProposalWriter:
    """Write side of ``proposals.h5`` (see the module doc): ``add`` one image's boxes at a time, in ``image_ids``
    order. Writes ``path`` in place: callers write a temp file and rename it, so readers never see a half-written
    file. ``params`` (JSON-able, with a ``method`` key) is what the boxes depend on; ``ProposalStore.params``."""

    def __init__(self, path: Path, split: str, params: dict, image_ids: Sequence[str]):
        self.path = Path(path)
        self._handle = h5py.File(self.path, "w")
        try:
            self._handle.attrs.update(schema=SCHEMA, split=split, method=params["method"], params=json.dumps(params),
                                      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._handle.create_dataset("image_ids", data=np.array(list(image_ids), dtype=object),
                                        dtype=h5py.string_dtype())
            self._boxes = self._handle.create_group("boxes")
        except BaseException:
            self._handle.close()
            raise

    def add(self, image_id: str, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Store one image's boxes (made for an image of ``width`` x ``height``); returns them as stored."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        require_free_space(self.path, boxes.nbytes + 4096, f"the proposals of image {image_id}")
        dataset = self._boxes.create_dataset(image_id, data=boxes, compression="gzip" if len(boxes) else None,
                                             shuffle=bool(len(boxes)))
        dataset.attrs.update(width=width, height=height)
        return boxes

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ProposalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_boxes_group(path: Path, image_ids: list[str]) -> dict[str, np.ndarray]:
    """The raw ``boxes/<image_id>`` arrays of ``image_ids`` found in an HDF5 file laid out like ``proposals.h5``
    (e.g. another run's, imported as precomputed boxes); a missing group or unreadable file is an InputError."""
    try:
        with h5py.File(path, "r") as handle:
            group = handle.get("boxes")
            if not isinstance(group, h5py.Group):
                raise InputError("no 'boxes' group (expected boxes/<image_id> datasets)", path)
            return {image_id: group[image_id][()] for image_id in image_ids if image_id in group}
    except OSError as exc:
        raise InputError(f"unreadable HDF5 ({exc})", path) from None


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
        return f"rerun `{command_for_path(self.path)}` to rebuild it"

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


__all__ = ["ProposalStore", "ProposalWriter", "load_proposals", "read_boxes_group", "selective_search",
           "raw_selective_search", "filter_boxes", "rects_to_boxes", "best_overlaps", "image_seed", "SCHEMA",
           "SS_COLOUR_SPACES", "SS_RANKING", "SS_STRATEGIES"]
