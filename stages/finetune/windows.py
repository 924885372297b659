"""``spp finetune``, its windows: which proposals fine-tuning trains on, the held-out split, and drawing and
pooling the windows of a run of batches.

``Entry`` is one training image (or its mirror) with its foreground and background windows; ``draw_batches``
draws the windows of the next batches as the released ``PrepareBatchData`` does; ``pool_draw`` pools them through
a ``Pooler`` (the conv5 cache's, ``cached.py``, or the live backbone's, ``conv.py``) into one float16 buffer, or
only a torchrun rank's rows of it (``rank_rows``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..core.errors import SppError
from ..core.roidb import ImageRois, max_overlap

IMAGE_OVERSAMPLE = 10  # released PrepareBatchData: images are taken until they hold 10x the windows a chunk needs


# -- windows ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One training image as fine-tuning sees it (itself or its mirror), with its candidate windows.
    Boxes are in the original (unflipped) image's coordinates; ``flip`` tells the pooler to mirror."""

    image_id: str
    width: int
    height: int
    flip: bool
    fg_boxes: np.ndarray  # float64 [F, 4]
    fg_labels: np.ndarray  # int64 [F], class index + 1
    bg_boxes: np.ndarray  # float64 [B, 4]


def select_windows(roi: ImageRois, fg_iou: float = 0.5,
                   bg_iou: tuple[float, float] = (0.1, 0.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``roi`` used for fine-tuning: foreground rows (max IoU >= fg_iou, GT rows included) with their
    labels (argmax class + 1), and background rows (max IoU in [bg_iou[0], bg_iou[1]), not foreground)."""
    best, cls = max_overlap(roi)
    fg = best >= np.float32(fg_iou)
    bg = ~fg & (best >= np.float32(bg_iou[0])) & (best < np.float32(bg_iou[1]))
    return np.flatnonzero(fg), cls[fg] + 1, np.flatnonzero(bg)


def has_windows(roi: ImageRois, fg_iou: float = 0.5, bg_iou: tuple[float, float] = (0.1, 0.5)) -> bool:
    """Does the image have any foreground or background window (an image without objects and proposals has none)?"""
    fg_rows, _, bg_rows = select_windows(roi, fg_iou, bg_iou)
    return len(fg_rows) + len(bg_rows) > 0


def make_entries(roidb: list[ImageRois], fg_iou: float, bg_iou: tuple[float, float], flip: bool) -> list[Entry]:
    """One entry per image, plus one per mirrored image when ``flip`` (labels are flip-invariant)."""
    entries = []
    for roi in roidb:
        fg_rows, fg_labels, bg_rows = select_windows(roi, fg_iou, bg_iou)
        for mirrored in (False, True) if flip else (False,):
            entries.append(Entry(roi.image_id, roi.width, roi.height, mirrored, roi.boxes[fg_rows],
                                 fg_labels, roi.boxes[bg_rows]))
    return entries


def split_holdout(image_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids): a seeded random ``fraction`` of the images, at least one on each side when
    ``fraction > 0``; both lists keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise SppError(f"finetune.holdout_fraction must be in [0, 1), got {fraction}")
    n = len(image_ids)
    n_hold = 0 if fraction == 0 or n < 2 else min(max(1, int(math.floor(fraction * n + 0.5))), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_hold].tolist())
    return ([i for k, i in enumerate(image_ids) if k not in held], [i for k, i in enumerate(image_ids) if k in held])


def learning_subset(rois: list, count: int, seed: int) -> list:
    """A seeded random ``count`` of the training images (input order kept), for learning curves; 0 or more than
    there are: all. Nested: the first ``k`` of the seeded order, so a smaller subset is part of every larger one."""
    if count <= 0 or count >= len(rois):
        return list(rois)
    chosen = set(np.random.default_rng([seed, 1]).permutation(len(rois))[:count].tolist())
    return [r for k, r in enumerate(rois) if k in chosen]


def batch_split(batch_size: int, fg_fraction: float) -> tuple[int, int]:
    """(foreground, background) windows per batch; 128 x 0.25 -> (32, 96). MATLAB int32() rounds half away."""
    n_fg = int(math.floor(fg_fraction * batch_size + 0.5))
    return n_fg, batch_size - n_fg


@dataclass(frozen=True)
class Draw:
    """Windows drawn for ``n_batches`` batches. Row ``rows[i]`` of the batch buffer gets window i; batch b is
    buffer rows ``b*batch_size .. (b+1)*batch_size``, foreground slots first."""

    entry: np.ndarray  # int64 [N], index into the entry list
    boxes: np.ndarray  # float64 [N, 4], original image coordinates
    labels: np.ndarray  # int64 [N]
    rows: np.ndarray  # int64 [N]
    n_batches: int
    batch_size: int


def draw_batches(entries: list[Entry], n_batches: int, batch_size: int, fg_fraction: float,
                 rng: np.random.Generator, oversample: int = IMAGE_OVERSAMPLE) -> Draw:
    """Windows for the next ``n_batches`` batches, as the released ``PrepareBatchData`` draws them: images in
    random order until they hold ``oversample`` times the foreground and background windows needed (all images
    when they do not), then windows at random among those images, without replacement unless too few."""
    n_fg, n_bg = batch_split(batch_size, fg_fraction)
    fg_total, bg_total = n_fg * n_batches, n_bg * n_batches
    order = rng.permutation(len(entries))
    fg_count = np.array([len(entries[i].fg_labels) for i in order], dtype=np.int64)
    bg_count = np.array([len(entries[i].bg_boxes) for i in order], dtype=np.int64)
    ends = [int(np.searchsorted(np.cumsum(fg_count), fg_total * oversample, side="right")),
            int(np.searchsorted(np.cumsum(bg_count), bg_total * oversample, side="right"))]
    end = len(order) if max(ends) >= len(order) else max(ends) + 1
    chosen = order[:end]

    parts = []
    for kind, total, per_batch, offset in (("fg", fg_total, n_fg, 0), ("bg", bg_total, n_bg, n_fg)):
        if total == 0:
            continue
        counts = fg_count[:end] if kind == "fg" else bg_count[:end]
        if counts.sum() == 0:
            what = "foreground (max IoU >= fg_iou)" if kind == "fg" else "background (max IoU in bg_iou)"
            raise SppError(f"no {what} windows among {len(chosen)} fine-tuning images: check the proposals "
                           "and finetune.fg_iou / finetune.bg_iou")
        owner = np.repeat(chosen, counts)
        pool_boxes = np.concatenate([entries[e].fg_boxes if kind == "fg" else entries[e].bg_boxes for e in chosen])
        pick = rng.choice(len(owner), size=total, replace=len(owner) < total)
        slot = np.arange(total)
        rows = (slot // per_batch) * batch_size + offset + slot % per_batch
        labels = (np.concatenate([entries[e].fg_labels for e in chosen])[pick] if kind == "fg"
                  else np.zeros(total, np.int64))
        parts.append((owner[pick].astype(np.int64), pool_boxes[pick], labels.astype(np.int64), rows.astype(np.int64)))
    return Draw(*(np.concatenate([p[k] for p in parts]) for k in range(4)), n_batches=n_batches,
                batch_size=batch_size)


class Pooler(Protocol):
    """Pools windows of one entry: (entry, boxes [n,4], scale choice "best" | "random", rng) -> [n, D]. With
    ``keep`` (a boolean mask over the boxes; only torchrun ranks pass it) it returns only the kept windows'
    features, but still draws the random scales of all n, so that ``rng`` moves on as without ``keep``."""

    def __call__(self, entry: Entry, boxes: np.ndarray, scale_choice: str, rng: np.random.Generator,
                 keep: np.ndarray | None = None) -> torch.Tensor: ...


def rank_rows(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of every batch that torchrun rank ``rank`` of ``world`` trains on (all in a plain run)."""
    return rank * batch_size // world, (rank + 1) * batch_size // world


def pool_draw(draw: Draw, entries: list[Entry], pooler: Pooler, dim: int, scale_choice: str,
              rng: np.random.Generator, device: torch.device,
              part: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every drawn window into a float16 [n_batches * batch_size, dim] buffer (one pooler call per image,
    images in index order so that the random scales are reproducible) and its int64 labels.

    ``part`` (a torchrun rank's share): a boolean mask over the buffer rows; only those rows are pooled and
    returned, in order, while the random scales are drawn for every window, so ``rng`` ends where the whole
    draw leaves it and every rank pools its rows of the very batches one process would."""
    total = draw.n_batches * draw.batch_size
    labels = torch.empty(total, dtype=torch.int64)
    labels[torch.from_numpy(draw.rows)] = torch.from_numpy(draw.labels)
    dest = draw.rows  # buffer row of each window
    if part is not None:
        labels = labels[torch.from_numpy(part)]
        dest = (np.cumsum(part) - 1)[draw.rows]  # rows outside the part are never written
    features = torch.empty((len(labels), dim), dtype=torch.float16, device=device)
    order = np.argsort(draw.entry, kind="stable")
    uniq, starts = np.unique(draw.entry[order], return_index=True)
    for e, a, b in zip(uniq, starts, [*starts[1:], len(order)]):
        sel = order[a:b]
        if part is None:
            pooled = pooler(entries[int(e)], draw.boxes[sel], scale_choice, rng)
        else:  # called even when nothing is kept: the image's random scales are drawn all the same
            keep = part[draw.rows[sel]]
            pooled, sel = pooler(entries[int(e)], draw.boxes[sel], scale_choice, rng, keep=keep), sel[keep]
        if pooled.shape != (len(sel), dim):
            raise SppError(f"pooled features of image {entries[int(e)].image_id!r} have shape "
                           f"{tuple(pooled.shape)}, expected ({len(sel)}, {dim})")
        features[torch.from_numpy(dest[sel]).to(device)] = pooled.detach().to(device, torch.float16)
    return features, labels.to(device)
