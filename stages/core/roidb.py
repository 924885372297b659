"""The region database: per image, its ground-truth boxes followed by its proposals, with class overlaps.

SPEC §3 [S:imdb/roidb_from_voc.m]: ground-truth rows come first, then the proposals; ``overlaps[:, k]`` is the
max IoU of each row with the image's class-k ground truth. Every GT object is included, difficult ones too (the
released script's ``with_hard_samples=false``; R-CNN does the same), so a GT row overlaps its own class with 1.
Boxes follow sppnet's convention (``boxes.py``), where plain IoU equals the devkit's "+1" IoU.

The small helpers below (``max_overlap``, ``best_gt``, ``flip_rois``) are what fine-tuning, the SVMs, box
regression and detection share, so that every stage reads the labels of a window the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .boxes import box_iou, flip_boxes
from .errors import InputError
from .registry import command_for_path
from .voc import Annotation, VocDataset

if TYPE_CHECKING:  # only the store's .boxes(image_id) is used here (any object with it will do)
    from .proposals import ProposalStore


@dataclass
class ImageRois:
    """One image's rows: ``boxes[:n_gt]`` are its ground truth (``is_gt``), the rest its proposals."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # float64 [R, 4], sppnet convention
    is_gt: np.ndarray  # bool [R]
    gt_label: np.ndarray  # int64 [R]: class index for GT rows, -1 for proposals
    gt_difficult: np.ndarray  # bool [R]: True only for difficult GT rows
    overlaps: np.ndarray  # float32 [R, K]: max IoU with the class-k GT (difficult included)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_gt(self) -> int:
        return int(self.is_gt.sum())


def class_overlaps(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [R, K]: for every box, the max IoU with the ground truth of each class (0 where a class has none)."""
    iou = box_iou(boxes, gt_boxes)  # [R, G] float64
    overlaps = np.zeros((len(iou), num_classes), dtype=np.float64)
    gt_labels = np.asarray(gt_labels, dtype=np.int64)
    if gt_labels.size and (gt_labels.min() < 0 or gt_labels.max() >= num_classes):
        raise ValueError(f"GT label outside 0..{num_classes - 1}: {gt_labels.tolist()}")
    if len(iou) and iou.shape[1]:
        # Scatter-max each GT column into its class column: one vectorised pass, however many GT per class.
        np.maximum.at(overlaps, (slice(None), gt_labels), iou)
    return overlaps.astype(np.float32)


def image_rois(annotation: Annotation, proposals: np.ndarray, num_classes: int) -> ImageRois:
    """GT rows (all objects, difficult included) then ``proposals``, with their class overlaps."""
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    n_gt, n_prop = len(annotation.boxes), len(proposals)
    boxes = np.concatenate([np.asarray(annotation.boxes, dtype=np.float64).reshape(-1, 4), proposals])
    return ImageRois(
        image_id=annotation.image_id,
        width=annotation.width,
        height=annotation.height,
        boxes=boxes,
        is_gt=np.concatenate([np.ones(n_gt, bool), np.zeros(n_prop, bool)]),
        gt_label=np.concatenate([np.asarray(annotation.labels, dtype=np.int64), np.full(n_prop, -1, np.int64)]),
        gt_difficult=np.concatenate([np.asarray(annotation.difficult, dtype=bool), np.zeros(n_prop, bool)]),
        overlaps=class_overlaps(boxes, annotation.boxes, annotation.labels, num_classes),
    )


def build_roidb(dataset: VocDataset, split: str, proposals: "ProposalStore",
                image_ids: Iterable[str] | None = None) -> list[ImageRois]:
    """The region database of ``split`` (or of ``image_ids``), in split order. With ``dataset.skip_bad`` a bad
    annotation is left out (warned about by the dataset); an image without proposals is a one-line error."""
    ids = dataset.usable_ids(split) if image_ids is None else list(image_ids)
    num_classes = len(dataset.classes)
    have = proposals if hasattr(proposals, "__contains__") else set(proposals.image_ids)  # O(1) per image
    roidb = []
    for image_id in ids:
        if image_id not in have:
            command = (command_for_path(proposals.path) if hasattr(proposals, "path")
                       else f"spp proposals --split {split}")
            raise InputError(f"no proposals for image {image_id!r} of split {split!r}; rerun `{command}`",
                             dataset.split_path(split))
        roidb.append(image_rois(dataset.annotation(image_id), proposals.boxes(image_id), num_classes))
    return roidb


def max_overlap(roi: ImageRois) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the max IoU with any GT (float32 [R]) and the class reaching it (int64 [R]; -1 where the row
    overlaps no GT at all, so that a zero-overlap row is never read as class 0). Ties go to the lower class."""
    if roi.overlaps.shape[1] == 0:
        return np.zeros(len(roi), np.float32), np.full(len(roi), -1, np.int64)
    best = roi.overlaps.max(axis=1)
    label = roi.overlaps.argmax(axis=1).astype(np.int64)
    label[best <= 0] = -1
    return best, label


def best_gt(roi: ImageRois) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the index of the GT row with the highest IoU (any class; -1 when the image has no GT) and that
    IoU (float64 [R]). Box regression takes its target G and its class from this row [SPEC §6]."""
    gt_rows = np.flatnonzero(roi.is_gt)
    if len(gt_rows) == 0:
        return np.full(len(roi), -1, np.int64), np.zeros(len(roi), np.float64)
    iou = box_iou(roi.boxes, roi.boxes[gt_rows])
    return gt_rows[iou.argmax(axis=1)].astype(np.int64), iou.max(axis=1)


def flip_rois(roi: ImageRois) -> ImageRois:
    """The same rows on the horizontally flipped image [SPEC §3]; overlaps are flip-invariant and are kept."""
    return ImageRois(roi.image_id, roi.width, roi.height, flip_boxes(roi.boxes, roi.width), roi.is_gt.copy(),
                     roi.gt_label.copy(), roi.gt_difficult.copy(), roi.overlaps.copy())
