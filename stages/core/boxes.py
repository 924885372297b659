"""The one box convention, IoU, NMS and bounding-box-regression targets.

Inside sppnet every box is float ``[x1, y1, x2, y2)`` in 0-based pixel coordinates (torchvision's convention).
VOC's 1-based inclusive integers convert exactly once, in ``voc.py``: ``x1 = xmin - 1, x2 = xmax``. With that,
the plain continuous IoU here equals the devkit's "+1" IoU exactly, and torchvision's ``box_iou``/``nms`` apply
as they are. Bounding-box regression uses ``w = x2 - x1`` on these boxes, i.e. the inclusive width
``xmax - xmin + 1``; the R-CNN code uses ``xmax - xmin`` (SPEC.md §6). Targets are relative, so the difference
is a sub-pixel shift of the reference centre and is consistent between training and testing.
"""
from __future__ import annotations

import numpy as np
import torch


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, [N,4] x [M,4] -> [N,M] float64, computed in float64 so that thresholds are exact.

    The same formula as torchvision's ``box_iou`` (tested against it), in numpy: importing torchvision costs
    1.6 s per process, which most stages otherwise never need."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    width = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(min=0)
    height = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(min=0)
    inter = width * height
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for every i (no N x N matrix), 0 where the union is empty."""
    ix = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    iy = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS in descending score order, suppressing IoU > threshold (SPEC §7)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    from .vision_ops import op  # torchvision's own kernel, without importing torchvision (see box_iou)

    keep = op("nms")(torch.from_numpy(boxes), torch.from_numpy(np.asarray(scores, dtype=np.float64)),
                     float(iou_threshold))
    return keep.numpy()


def nms_top(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """``nms(boxes, scores, iou_threshold)[:limit]``, computed on as few of the top-scoring boxes as give it.

    Greedy NMS decides each box from the boxes ranked above it alone (the kernel ranks by score, ties by index:
    a stable sort), so NMS on the top ``m`` boxes of that ranking keeps exactly the full result's kept boxes
    among them. Once ``limit`` are kept, no lower box can enter the first ``limit``. Detection keeps 100 a class
    from about 2,000 windows; most classes of an image need a few hundred of them, where the full pass costs
    time quadratic in all 2,000."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    limit = int(limit)
    if limit < 0:
        raise ValueError(f"nms_top keeps a number of boxes, not {limit}")
    if limit == 0 or len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    if np.isnan(scores).any():  # the kernel ranks NaN first, numpy last: no shortcut to take
        return nms(boxes, scores, iou_threshold)[:limit]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-scores, kind="stable")  # the kernel's ranking: score descending, ties by index
    count = min(len(order), max(4 * limit, 256))
    while True:
        top = order[:count]  # in ranking order, so the kernel's stable sort keeps it
        keep = top[nms(boxes[top], scores[top], iou_threshold)]
        if len(keep) >= limit or count == len(order):
            return keep[:limit]
        count = min(len(order), 4 * count)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Horizontal flip: the devkit's ``x' = W + 1 - x`` with x1/x2 swapped is ``x' = W - x`` here."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def _centre_size(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def bbox_targets(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """R-CNN regression targets (t_x, t_y, t_w, t_h) from proposals P to ground truth G [SPEC §6]."""
    px, py, pw, ph = _centre_size(proposals)
    gx, gy, gw, gh = _centre_size(gt)
    pw, ph = np.maximum(pw, 1e-6), np.maximum(ph, 1e-6)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(np.maximum(gw, 1e-6) / pw),
                     np.log(np.maximum(gh, 1e-6) / ph)], axis=1)


def apply_bbox_deltas(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of ``bbox_targets``: ``apply_bbox_deltas(P, bbox_targets(P, G)) == G``."""
    px, py, pw, ph = _centre_size(proposals)
    deltas = np.asarray(deltas, dtype=np.float64).reshape(-1, 4)
    cx = deltas[:, 0] * pw + px
    cy = deltas[:, 1] * ph + py
    w = np.exp(deltas[:, 2]) * pw
    h = np.exp(deltas[:, 3]) * ph
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)
