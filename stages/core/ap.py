"""VOC detection average precision, exactly as the 2007 devkit's ``VOCevaldet.m`` computes it (SPEC §7).

Per class: pool the detections over the evaluated images, sort them by descending score with a *stable* sort
(MATLAB's ``sort(-confidence)``: equal scores keep their file order), and walk them in that order. Each detection
takes the same-class ground truth of its image with the highest IoU (the first one on ties, difficult boxes
included). IoU >= 0.5 on a difficult box: ignored; on an unmatched box: true positive (the box is now matched);
on a matched box: false positive (duplicate). Otherwise: false positive. ``npos`` counts non-difficult boxes.

Exactness, not just closeness:
- IoU is computed in float64 with the devkit's own operations on its own 1-based inclusive coordinates
  (``iw = min(x2) - max(x1) + 1`` ...), so IoUs that are exactly 0.5 compare exactly as in MATLAB.
- The 11 recall thresholds are ``t = k*0.1`` in float64, as the project's specification states the devkit's
  ``0:0.1:1`` (so "0.3" is 0.30000000000000004, "0.6" 0.6000000000000001, "0.7" 0.7000000000000001).
  Caveat: MathWorks documents that MATLAB's colon operator builds the second half of a range from its end
  (``stop - k*step``), which would make 0.6 and 0.7 the exact doubles; the two differ only when a class's
  recall is exactly 0.6 or 0.7. ``matlab_colon`` reproduces MATLAB's construction for whoever needs it.
- MATLAB's ``max`` skips NaN: precision is NaN (0/0) while only ignored detections have been seen.

The matching is sequential in the devkit but vectorises exactly: a detection's best box does not depend on
earlier detections, and of the detections whose best box is a given non-difficult box (with IoU >= 0.5) the
first in sorted order is the true positive and every later one a duplicate.

``metric="area"`` is the VOC2010+ devkit's ``VOCap``: the area under the monotone precision envelope.

Classes without non-difficult ground truth (npos = 0): ``VOCevaldet`` (2007) gives AP 0, because recall is
0/0 = NaN and no NaN recall passes a threshold; we give 0 for both metrics (the 2010+ ``VOCap`` would give NaN
when such a class has detections). If every detection of a class is ignored (all hit difficult boxes) while
npos > 0, the 2007 devkit's AP is NaN (max over all-NaN precision); we keep that, as the devkit does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError
from .voc import Annotation, Detections

METRICS = ("voc07", "area")
DEVKIT_MIN_OVERLAP = 0.5  # VOCopts.minoverlap


def matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
    """MATLAB's ``start:step:stop`` for a step that divides the range evenly (MathWorks' colonop.m, solution
    1-4FLI96): the first half is ``start + k*step``, the second half ``stop - k*step``, and when the number of
    intervals is even, the middle element is ``(start + stop) / 2``."""
    intervals = int(np.floor((stop - start) / step + 0.5))
    out = np.empty(intervals + 1, dtype=np.float64)
    k = np.arange(intervals // 2 + 1, dtype=np.float64)
    out[:len(k)] = start + k * step
    out[intervals - np.arange(len(k))] = stop - k * step
    if intervals % 2 == 0:
        out[intervals // 2] = (start + stop) / 2
    return out


# ``for t=0:0.1:1`` in VOCevaldet.m, as k*0.1 (see the module docstring).
VOC07_RECALL_THRESHOLDS = np.arange(11, dtype=np.float64) * 0.1


@dataclass(frozen=True)
class ClassEval:
    """One class's evaluation. Arrays are per detection, in the evaluation (stable, descending score) order."""

    ap: float
    precision: np.ndarray  # float64 [N]: cumTP / (cumTP + cumFP); NaN while only ignored detections were seen
    recall: np.ndarray  # float64 [N]: cumTP / npos (NaN when npos is 0)
    npos: int  # non-difficult ground-truth boxes
    tp: np.ndarray  # int64 [N]: 1 for a true positive (not cumulative)
    fp: np.ndarray  # int64 [N]: 1 for a false positive; tp = fp = 0 means ignored (difficult box)
    order: np.ndarray  # int64 [N]: index of each sorted detection in the caller's arrays

    @property
    def num_detections(self) -> int:
        return len(self.order)


def evaluate_class(gt: Mapping[str, tuple[np.ndarray, np.ndarray]], det_ids: Sequence[str],
                   det_scores: np.ndarray, det_boxes: np.ndarray, iou_threshold: float = DEVKIT_MIN_OVERLAP,
                   metric: str = "voc07", *, source: str | Path | None = None) -> ClassEval:
    """AP of one class. ``gt`` maps every evaluated image id (including images without a box of this class) to
    ``(boxes [M,4] in sppnet's convention, difficult bool [M])``. A detection on an image that is not in ``gt``
    is an InputError naming ``source`` (the devkit stops with 'unrecognized image')."""
    image_index = {image_id: i for i, image_id in enumerate(gt)}
    boxes_list = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b, _ in gt.values()]
    diff_list = [np.asarray(d, dtype=bool).reshape(-1) for _, d in gt.values()]
    for image_id, b, d in zip(gt, boxes_list, diff_list):
        if len(b) != len(d):
            raise ValueError(f"image {image_id!r}: {len(b)} boxes but {len(d)} difficult flags")
    counts = np.array([len(b) for b in boxes_list], dtype=np.int64)
    gt_boxes = np.concatenate(boxes_list) if boxes_list else np.zeros((0, 4))
    gt_difficult = np.concatenate(diff_list) if diff_list else np.zeros(0, dtype=bool)
    return _evaluate_flat(image_index, counts, gt_boxes, gt_difficult, det_ids, det_scores, det_boxes,
                          iou_threshold, metric, source)


def evaluate_detections(annotations: Sequence[Annotation], classes: Sequence[str],
                        per_class_dets: Mapping[str, Detections], metric: str = "voc07", *,
                        iou_threshold: float = DEVKIT_MIN_OVERLAP,
                        sources: Mapping[str, str | Path] | None = None) -> dict:
    """Evaluate every class of ``classes`` (label k of an annotation is ``classes[k]``) over the images of
    ``annotations``. A class missing from ``per_class_dets`` has no detections. ``sources`` names the file of
    each class's detections for error messages. mAP is the mean over all classes, AP-0 classes included.

    Returns ``{"mAP", "metric", "ap": {class: AP}, "npos": {class: n}, "num_detections": {class: n},
    "curves": {class: {"recall": [N], "precision": [N]}}, "evals": {class: ClassEval}}``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    image_index = {}
    for i, ann in enumerate(annotations):
        if ann.image_id in image_index:
            raise ValueError(f"image {ann.image_id!r} is listed twice")
        image_index[ann.image_id] = i
    # All ground truth once, grouped by image in annotation order; each class takes its rows (order kept).
    gt_image = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, a in enumerate(annotations)]
                              or [np.zeros(0, dtype=np.int64)])
    gt_boxes = np.concatenate([np.asarray(a.boxes, dtype=np.float64).reshape(-1, 4) for a in annotations]
                              or [np.zeros((0, 4))])
    gt_labels = np.concatenate([np.asarray(a.labels, dtype=np.int64) for a in annotations]
                               or [np.zeros(0, dtype=np.int64)])
    gt_difficult = np.concatenate([np.asarray(a.difficult, dtype=bool) for a in annotations]
                                  or [np.zeros(0, dtype=bool)])
    evals: dict[str, ClassEval] = {}
    for k, name in enumerate(classes):
        rows = gt_labels == k
        counts = np.bincount(gt_image[rows], minlength=len(annotations)).astype(np.int64)
        dets = per_class_dets.get(name)
        if dets is None:
            dets = Detections(image_ids=[], scores=np.zeros(0), boxes=np.zeros((0, 4)))
        evals[name] = _evaluate_flat(image_index, counts, gt_boxes[rows], gt_difficult[rows], dets.image_ids,
                                     dets.scores, dets.boxes, iou_threshold, metric,
                                     (sources or {}).get(name))
    aps = {name: float(e.ap) for name, e in evals.items()}
    return {
        "mAP": float(np.mean(list(aps.values()))) if aps else float("nan"),
        "metric": metric,
        "ap": aps,
        "npos": {name: e.npos for name, e in evals.items()},
        "num_detections": {name: e.num_detections for name, e in evals.items()},
        "curves": {name: {"recall": e.recall, "precision": e.precision} for name, e in evals.items()},
        "evals": evals,
    }


def _evaluate_flat(image_index: Mapping[str, int], gt_counts: np.ndarray, gt_boxes: np.ndarray,
                   gt_difficult: np.ndarray, det_ids: Sequence[str], det_scores, det_boxes,
                   iou_threshold: float, metric: str, source) -> ClassEval:
    """The devkit's per-class evaluation on ground truth flattened image by image (``gt_counts[i]`` rows of
    ``gt_boxes`` belong to image i, in annotation order)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    if not (len(det_ids) == len(scores) == len(boxes)):
        raise ValueError(f"{len(det_ids)} ids, {len(scores)} scores and {len(boxes)} boxes do not match")
    det_image = np.fromiter((image_index.get(i, -1) for i in det_ids), dtype=np.int64, count=len(det_ids))
    unknown = np.flatnonzero(det_image < 0)
    if len(unknown):
        raise InputError(f"{len(unknown)} detection(s) on images that are not in the evaluated set, e.g. "
                         f"{det_ids[unknown[0]]!r} (the devkit stops with 'unrecognized image')", source)
    npos = int(np.count_nonzero(~gt_difficult))

    # [sc,si] = sort(-confidence): stable, so equal scores keep the file order.
    order = np.argsort(-scores, kind="stable")
    det_image = det_image[order]
    det_devkit = _to_devkit(boxes[order])
    gt_devkit = _to_devkit(gt_boxes)
    gt_offsets = np.concatenate([[0], np.cumsum(gt_counts)])

    # Every (detection, same-image box) pair, detection-major, boxes in annotation order.
    pairs_per_det = gt_counts[det_image]
    pair_det = np.repeat(np.arange(len(order)), pairs_per_det)
    pair_start = np.concatenate([[0], np.cumsum(pairs_per_det)])[:-1]
    pair_gt = gt_offsets[det_image][pair_det] + (np.arange(len(pair_det)) - pair_start[pair_det])
    overlap = _devkit_overlap(det_devkit[pair_det], gt_devkit[pair_gt])

    # ovmax / jmax: the first box with the highest overlap ("if ov>ovmax"), among boxes that intersect.
    ovmax = np.full(len(order), -np.inf)
    jmax = np.full(len(order), -1, dtype=np.int64)
    has_pairs = pairs_per_det > 0
    if len(pair_det):
        ovmax[has_pairs] = np.maximum.reduceat(overlap, pair_start[has_pairs])
        is_best = (overlap == ovmax[pair_det]) & (overlap > -np.inf)
        best_det, first = np.unique(pair_det[is_best], return_index=True)
        jmax[best_det] = pair_gt[np.flatnonzero(is_best)[first]]

    matched = ovmax >= iou_threshold
    hits_difficult = np.zeros(len(order), dtype=bool)
    hits_difficult[matched] = gt_difficult[jmax[matched]]
    candidates = np.flatnonzero(matched & ~hits_difficult)
    tp = np.zeros(len(order), dtype=np.int64)
    _, first_per_box = np.unique(jmax[candidates], return_index=True)
    tp[candidates[first_per_box]] = 1
    fp = ((~matched) | (matched & ~hits_difficult & (tp == 0))).astype(np.int64)

    cum_tp = np.cumsum(tp).astype(np.float64)
    cum_fp = np.cumsum(fp).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = cum_tp / npos if npos else np.full(len(order), np.nan)  # MATLAB: 0/0 = NaN
        precision = cum_tp / (cum_fp + cum_tp)
    ap = voc07_ap(recall, precision, npos) if metric == "voc07" else area_ap(recall, precision, npos)
    return ClassEval(ap=float(ap), precision=precision, recall=recall, npos=npos, tp=tp, fp=fp, order=order)


def voc07_ap(recall: np.ndarray, precision: np.ndarray, npos: int) -> float:
    """``ap = sum over t in 0:0.1:1 of max(prec(rec >= t)) / 11``, with MATLAB's NaN-skipping max and 0 for
    an empty selection. Recall is non-decreasing, so ``rec >= t`` selects a suffix of the curve."""
    if npos == 0 or len(recall) == 0:
        return 0.0  # every recall is NaN (0/0), so no threshold selects anything
    suffix_max = np.fmax.accumulate(precision[::-1])[::-1]  # fmax skips NaN like MATLAB's max
    ap = 0.0
    for t in VOC07_RECALL_THRESHOLDS:
        first = np.searchsorted(recall, t, side="left")  # first index with recall >= t
        p = suffix_max[first] if first < len(recall) else 0.0
        ap = ap + p / 11
    return float(ap)


def area_ap(recall: np.ndarray, precision: np.ndarray, npos: int) -> float:
    """VOC2010+ ``VOCap``: make precision monotone from the right, then sum it over the recall steps."""
    if npos == 0:
        return 0.0  # our choice: no positives, nothing found (VOCap itself would give NaN with detections)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.fmax.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _to_devkit(boxes: np.ndarray) -> np.ndarray:
    """sppnet ``[x1, y1, x2, y2)`` -> the devkit's 1-based inclusive coordinates. ``voc.py`` made x1 = xmin - 1,
    which is exact for xmin >= 0.5, so adding 1 gives back the devkit's number bit for bit."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] += 1
    return out


def _devkit_overlap(bb: np.ndarray, bbgt: np.ndarray) -> np.ndarray:
    """VOCevaldet.m's overlap of row-paired boxes, operation for operation; -inf where the boxes do not
    intersect (``iw>0 & ih>0`` fails), so that such a box never becomes ``jmax``."""
    iw = np.minimum(bb[:, 2], bbgt[:, 2]) - np.maximum(bb[:, 0], bbgt[:, 0]) + 1
    ih = np.minimum(bb[:, 3], bbgt[:, 3]) - np.maximum(bb[:, 1], bbgt[:, 1]) + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        ua = ((bb[:, 2] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 1] + 1)
              + (bbgt[:, 2] - bbgt[:, 0] + 1) * (bbgt[:, 3] - bbgt[:, 1] + 1)
              - iw * ih)
        ov = iw * ih / ua
    # NaN never wins "ov > ovmax" in MATLAB; -inf has the same effect here.
    return np.where((iw > 0) & (ih > 0) & ~np.isnan(ov), ov, -np.inf)
