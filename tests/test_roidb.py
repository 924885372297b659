"""Region database: GT rows first, class overlaps against hand-computed IoUs, the shared label helpers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from stages.core.boxes import box_iou
from stages.core.errors import InputError
from stages.core.roidb import best_gt, build_roidb, class_overlaps, flip_rois, image_rois, max_overlap
from stages.core.voc import Annotation, VocDataset


def _annotation(boxes, labels, difficult=None, image_id="im", width=100, height=80) -> Annotation:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return Annotation(image_id, width, height, boxes, np.asarray(labels, dtype=np.int64),
                      np.asarray(difficult if difficult is not None else [False] * len(boxes), dtype=bool))


def test_overlaps_match_hand_computed_ious():
    # GT: class 0 = [0,0,20,20) (area 400), class 2 = [40,40,60,60) and [50,0,70,10).
    gt = _annotation([[0, 0, 20, 20], [40, 40, 60, 60], [50, 0, 70, 10]], [0, 2, 2], [False, True, False])
    proposals = np.array([
        [0, 0, 10, 10],  # nested in the class-0 box: 100 / 400 = 0.25
        [10, 0, 30, 20],  # half overlap: 200 / (400 + 400 - 200) = 1/3
        [45, 45, 65, 65],  # 15*15 / (400 + 400 - 225) = 225/575 with the difficult class-2 box
        [50, 0, 60, 10],  # nested in the second class-2 box (100 / 200) and far from the first
        [80, 60, 90, 70],  # touches nothing
    ], dtype=np.float64)
    roi = image_rois(gt, proposals, num_classes=3)
    expected = np.zeros((8, 3))
    expected[0, 0] = 1.0  # GT rows overlap their own class fully
    expected[1, 2] = expected[2, 2] = 1.0
    expected[3, 0] = 0.25
    expected[4, 0] = 1 / 3
    expected[5, 2] = 225 / 575
    expected[6, 2] = 0.5
    expected[2, 2] = 1.0
    assert roi.overlaps.dtype == np.float32 and roi.overlaps.shape == (8, 3)
    np.testing.assert_allclose(roi.overlaps, expected, atol=1e-7)
    # GT first (difficult included), then the proposals untouched.
    assert roi.is_gt.tolist() == [True] * 3 + [False] * 5
    assert roi.gt_label.tolist() == [0, 2, 2, -1, -1, -1, -1, -1]
    assert roi.gt_difficult.tolist() == [False, True, False] + [False] * 5
    np.testing.assert_array_equal(roi.boxes[3:], proposals)
    assert roi.num_gt == 3 and len(roi) == 8


def test_overlaps_are_the_per_class_max_of_a_loop_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        xy = rng.uniform(0, 90, (40, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(2, 40, (40, 2))], axis=1)
        gt = boxes[:6] + rng.normal(0, 3, (6, 4))
        gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
        labels = rng.integers(0, 4, 6)
        iou = box_iou(boxes, gt)
        reference = np.zeros((40, 4))
        for r in range(40):
            for g in range(6):
                reference[r, labels[g]] = max(reference[r, labels[g]], iou[r, g])
        np.testing.assert_allclose(class_overlaps(boxes, gt, labels, 4), reference, atol=1e-7)


def test_image_without_ground_truth_and_without_proposals():
    empty = _annotation(np.zeros((0, 4)), [])
    roi = image_rois(empty, np.array([[1, 1, 5, 5.0]]), num_classes=2)
    assert roi.overlaps.shape == (1, 2) and not roi.overlaps.any()
    assert roi.num_gt == 0
    best, cls = max_overlap(roi)
    assert best.tolist() == [0.0] and cls.tolist() == [-1]  # no overlap is never read as class 0
    rows, iou = best_gt(roi)
    assert rows.tolist() == [-1] and iou.tolist() == [0.0]
    only_gt = image_rois(_annotation([[0, 0, 4, 4]], [1]), np.zeros((0, 4)), num_classes=2)
    assert len(only_gt) == 1 and only_gt.overlaps.tolist() == [[0.0, 1.0]]


def test_bad_gt_label_is_refused():
    with pytest.raises(ValueError, match="GT label"):
        class_overlaps(np.array([[0, 0, 1, 1.0]]), np.array([[0, 0, 1, 1.0]]), np.array([3]), 3)


def test_max_overlap_and_best_gt():
    # GT row 0 is class 1, GT row 1 is class 0.
    gt = _annotation([[0, 0, 20, 20], [30, 0, 50, 20]], [1, 0])
    roi = image_rois(gt, np.array([[0, 0, 10, 20], [25, 0, 50, 20], [12, 0, 38, 20]], dtype=np.float64), 2)
    best, cls = max_overlap(roi)
    # [0,10) vs row 0: 200/400; [25,50) vs row 1: 400/500; [12,38) overlaps 8 px of each: 160/760 twice.
    np.testing.assert_allclose(best, [1, 1, 0.5, 0.8, 160 / 760], rtol=1e-6)
    assert cls.tolist() == [1, 0, 1, 0, 0]  # the tie goes to the lower class index
    rows, iou = best_gt(roi)
    assert rows.tolist() == [0, 1, 0, 1, 0]  # the tie goes to the first GT row
    np.testing.assert_allclose(iou, [1, 1, 0.5, 0.8, 160 / 760])


def test_flip_keeps_overlaps_and_mirrors_boxes():
    gt = _annotation([[10, 5, 30, 25]], [0], width=100)
    roi = image_rois(gt, np.array([[0, 0, 20, 20.0]]), 1)
    flipped = flip_rois(roi)
    np.testing.assert_array_equal(flipped.boxes, [[70, 5, 90, 25], [80, 0, 100, 20]])
    np.testing.assert_array_equal(flipped.overlaps, roi.overlaps)
    # Mirroring both boxes preserves IoU, so the kept overlaps are the overlaps of the flipped boxes.
    np.testing.assert_allclose(box_iou(flipped.boxes[1:], flipped.boxes[:1])[0, 0], roi.overlaps[1, 0], rtol=1e-6)


@dataclass
class _Proposals:
    table: dict

    @property
    def image_ids(self):
        return list(self.table)

    def boxes(self, image_id):
        return self.table[image_id]


def test_build_roidb_from_a_devkit(tiny_devkit):
    dataset = VocDataset(tiny_devkit)
    props = _Proposals({"img0": np.array([[12, 10, 50, 40.0], [0, 0, 8, 8]]), "img1": np.zeros((0, 4))})
    roidb = build_roidb(dataset, "train", props)
    assert [r.image_id for r in roidb] == ["img0", "img1"]
    first = roidb[0]
    # img0: red (13,11,50,40) -> [12,10,50,40), green (56,46,75,60) -> [55,45,75,60).
    np.testing.assert_array_equal(first.boxes[:2], [[12, 10, 50, 40], [55, 45, 75, 60]])
    assert first.is_gt.tolist() == [True, True, False, False]
    np.testing.assert_allclose(first.overlaps[2], [1.0, 0.0])
    assert roidb[1].num_gt == 2 and len(roidb[1]) == 2
    with pytest.raises(InputError, match="no proposals for image 'img1'"):
        build_roidb(dataset, "train", _Proposals({"img0": np.zeros((0, 4))}))
    only = build_roidb(dataset, "train", props, image_ids=["img1"])
    assert [r.image_id for r in only] == ["img1"]
