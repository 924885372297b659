"""VOC AP: hand-computed cases, and the fast implementation against a literal transcription of VOCevaldet.m."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stages.core.ap import (VOC07_RECALL_THRESHOLDS, area_ap, evaluate_class, evaluate_detections, matlab_colon,
                            voc07_ap)
from stages.core.errors import InputError
from stages.core.voc import Annotation, Detections, read_comp4, voc_to_boxes, write_comp4

VOC_TEST_ROOT = Path("/work/shared/voc2007/VOCdevkit")


# -- the reference: VOCevaldet.m (VOCdevkit 2007) line by line, on the devkit's own 1-based coordinates -------------
def matlab_colon_reference(a: float, d: float, b: float) -> list[float]:
    """colonop.m (MathWorks solution 1-4FLI96) for an evenly divided range: both halves from their own end."""
    n = int(round((b - a) / d))
    out = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = b - k * d
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


def matlab_max(values: list[float]):
    """MATLAB ``max`` of a vector: [] for an empty one, NaN entries skipped, NaN only if all are NaN."""
    if not values:
        return None
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def matlab_divide(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


def reference_voc_evaldet(gtids, recs, ids, confidence, BB, minoverlap=0.5, metric="voc07"):
    """``recs[i]`` = (list of devkit boxes [xmin ymin xmax ymax], list of difficult flags) of image ``gtids[i]``;
    ``ids``/``confidence``/``BB`` = the comp4 file's columns. Returns (ap, rec, prec, tp, fp) like the devkit."""
    gt = [{"BB": list(boxes), "diff": list(diff), "det": [False] * len(boxes)} for boxes, diff in recs]
    npos = sum(sum(1 for flag in g["diff"] if not flag) for g in gt)
    si = sorted(range(len(confidence)), key=lambda d: -confidence[d])  # [sc,si]=sort(-confidence): stable
    ids = [ids[d] for d in si]
    BB = [BB[d] for d in si]
    nd = len(confidence)
    tp = [0] * nd
    fp = [0] * nd
    gt_row = {g: k for k, g in enumerate(gtids)}  # strmatch(ids{d},gtids,'exact'); ids are unique
    assert len(gt_row) == len(gtids), "multiple image"
    for d in range(nd):
        if ids[d] not in gt_row:
            raise RuntimeError(f'unrecognized image "{ids[d]}"')
        i = gt_row[ids[d]]
        bb = BB[d]
        ovmax = -math.inf
        jmax = None
        for j in range(len(gt[i]["BB"])):
            bbgt = gt[i]["BB"][j]
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                      - iw * ih)
                ov = matlab_divide(iw * ih, ua)
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        if ovmax >= minoverlap:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    ctp, cfp, rec, prec = 0, 0, [], []
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(matlab_divide(float(ctp), float(npos)))
        prec.append(matlab_divide(float(ctp), float(cfp + ctp)))
    if metric == "voc07":
        ap = 0.0
        for t in [k * 0.1 for k in range(11)]:  # 0:0.1:1 as k*0.1
            p = matlab_max([p for r, p in zip(rec, prec) if r >= t])
            if p is None:
                p = 0.0
            ap = ap + p / 11
    else:  # VOCap.m (VOCdevkit 2010+)
        mrec = [0.0] + rec + [1.0]
        mpre = [0.0] + prec + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = matlab_max([mpre[i], mpre[i + 1]])
        steps = [i + 1 for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]]  # NaN ~= x is true
        ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in steps)
    return ap, rec, prec, tp, fp


# -- helpers ---------------------------------------------------------------------------------------------------------
def make_gt(records: dict[str, list[tuple[tuple[float, float, float, float], bool]]]):
    """{image_id: [((xmin, ymin, xmax, ymax) devkit, difficult), ...]} -> evaluate_class's gt dict."""
    return {image_id: (voc_to_boxes(np.array([b for b, _ in objs], dtype=np.float64).reshape(-1, 4)),
                       np.array([d for _, d in objs], dtype=bool)) for image_id, objs in records.items()}


def run_fast(records, dets, metric="voc07"):
    """dets: [(image_id, score, (xmin, ymin, xmax, ymax) devkit)] -> ClassEval."""
    ids = [d[0] for d in dets]
    scores = np.array([d[1] for d in dets], dtype=np.float64)
    boxes = voc_to_boxes(np.array([d[2] for d in dets], dtype=np.float64).reshape(-1, 4))
    return evaluate_class(make_gt(records), ids, scores, boxes, metric=metric)


def run_reference(records, dets, metric="voc07"):
    gtids = list(records)
    recs = [([list(map(float, b)) for b, _ in objs], [d for _, d in objs]) for objs in records.values()]
    return reference_voc_evaldet(gtids, recs, [d[0] for d in dets], [float(d[1]) for d in dets],
                                 [list(map(float, d[2])) for d in dets], metric=metric)


def ap_of_thresholds(points: list[tuple[float, float]]) -> float:
    """Hand evaluation of the 11-point sum for a list of (recall, precision), thresholds as MATLAB builds them."""
    ap = 0.0
    for t in [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6000000000000001, 0.7000000000000001, 0.8, 0.9, 1.0]:
        ps = [p for r, p in points if r >= t and not math.isnan(p)]
        ap += (max(ps) if ps else 0.0) / 11
    return ap


GT_BOX = (1, 1, 10, 10)  # a 10x10 box in devkit coordinates
FAR_BOX = (50, 50, 60, 60)


# -- MATLAB's 0:0.1:1 ------------------------------------------------------------------------------------------------
def test_thresholds_are_k_times_a_tenth_and_matlab_colon_is_available():
    assert VOC07_RECALL_THRESHOLDS.tolist() == [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6000000000000001,
                                                0.7000000000000001, 0.8, 0.9, 1.0]
    assert matlab_colon(0, 0.1, 1).tolist() == matlab_colon_reference(0, 0.1, 1)
    assert matlab_colon(0, 0.1, 1).tolist() == [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # MATLAB Answers "Floating point accuracy and COLON" (2012): (0:0.1:0.3) - (0:0.1:0.4)(1:4) printed as
    # 1.0e-16 * [0 0 -0.2776 -0.5551]; a naive start + k*step would give all zeros.
    diff = matlab_colon(0, 0.1, 0.3) - matlab_colon(0, 0.1, 0.4)[:4]
    np.testing.assert_allclose(diff * 1e16, [0, 0, -0.2776, -0.5551], atol=1e-4)
    assert matlab_colon(0, 0.1, 0.3)[-1] == 0.3


# -- hand-computed cases ---------------------------------------------------------------------------------------------
def test_tie_order_is_stable_and_matters():
    records = {"a": [(GT_BOX, False)], "b": []}
    false_first = [("b", 0.9, GT_BOX), ("a", 0.9, GT_BOX)]
    true_first = [("a", 0.9, GT_BOX), ("b", 0.9, GT_BOX)]
    # file order FP, TP: prec [0, 1/2], rec [0, 1] -> every threshold sees 1/2
    ev = run_fast(records, false_first)
    assert ev.tp.tolist() == [0, 1] and ev.fp.tolist() == [1, 0]
    assert ev.ap == pytest.approx(0.5, abs=1e-15)
    # file order TP, FP: prec [1, 1/2], rec [1, 1] -> every threshold sees 1
    ev = run_fast(records, true_first)
    assert ev.tp.tolist() == [1, 0] and ev.ap == pytest.approx(1.0, abs=1e-15)
    # a higher score always goes first, whatever the file order
    ev = run_fast(records, [("b", 0.5, GT_BOX), ("a", 0.9, GT_BOX)])
    assert ev.order.tolist() == [1, 0] and ev.ap == pytest.approx(1.0, abs=1e-15)


def test_difficult_ground_truth_is_ignored():
    records = {"a": [(GT_BOX, True), (FAR_BOX, False)]}
    dets = [("a", 0.9, GT_BOX), ("a", 0.8, FAR_BOX), ("a", 0.7, (20, 20, 30, 30))]
    ev = run_fast(records, dets)
    assert ev.npos == 1
    assert ev.tp.tolist() == [0, 1, 0] and ev.fp.tolist() == [0, 0, 1]  # the first one: neither
    assert np.isnan(ev.precision[0]) and ev.precision[1:].tolist() == [1.0, 0.5]
    assert ev.recall.tolist() == [0.0, 1.0, 1.0]
    assert ev.ap == pytest.approx(1.0, abs=1e-15)  # MATLAB's max skips the NaN precision at t = 0


def test_every_detection_ignored_gives_nan_like_the_devkit():
    ev = run_fast({"a": [(GT_BOX, True), (FAR_BOX, False)]}, [("a", 0.9, GT_BOX), ("a", 0.8, GT_BOX)])
    assert ev.tp.tolist() == [0, 0] and ev.fp.tolist() == [0, 0]
    assert math.isnan(ev.ap)  # max(prec(rec >= 0)) over all-NaN precision is NaN in MATLAB
    assert math.isnan(run_reference({"a": [(GT_BOX, True), (FAR_BOX, False)]},
                                    [("a", 0.9, GT_BOX), ("a", 0.8, GT_BOX)])[0])


def test_duplicates_are_false_positives():
    records = {"a": [(GT_BOX, False)], "b": [(GT_BOX, False)]}
    ev = run_fast(records, [("a", 0.9, GT_BOX), ("a", 0.8, (1, 1, 10, 9))])
    assert ev.tp.tolist() == [1, 0] and ev.fp.tolist() == [0, 1]
    # rec [.5, .5], prec [1, .5]: thresholds 0 .. 0.5 (six of them) see 1, the other five nothing
    assert ev.ap == pytest.approx(6 / 11, abs=1e-15)


def test_best_box_tie_goes_to_the_first_annotated_box():
    # The detection overlaps both boxes with IoU 0.55 exactly; "if ov>ovmax" keeps the first one.
    left, right, det = (1, 1, 10, 10), (3, 1, 12, 10), (2, 1, 11, 10)  # inter 9x10 = 90, union 110 each
    ev = run_fast({"a": [(left, True), (right, False)]}, [("a", 0.9, det)])
    assert ev.tp.tolist() == [0] and ev.fp.tolist() == [0]  # matched the difficult box: ignored
    ev = run_fast({"a": [(right, False), (left, True)]}, [("a", 0.9, det)])
    assert ev.tp.tolist() == [1]


def test_class_without_positives_scores_zero():
    ev = run_fast({"a": [], "b": [(GT_BOX, True)]}, [("a", 0.9, GT_BOX), ("b", 0.8, GT_BOX)])
    assert ev.npos == 0 and np.isnan(ev.recall).all()
    assert ev.ap == 0.0  # VOCevaldet: NaN recalls pass no threshold, so every p is [] -> 0
    assert run_reference({"a": [], "b": [(GT_BOX, True)]}, [("a", 0.9, GT_BOX), ("b", 0.8, GT_BOX)])[0] == 0.0
    assert run_fast({"a": []}, [("a", 0.9, GT_BOX)], metric="area").ap == 0.0  # our choice for the area AP
    assert run_fast({"a": []}, []).ap == 0.0


def test_no_detections_scores_zero():
    ev = run_fast({"a": [(GT_BOX, False)], "b": [(GT_BOX, True)]}, [])
    assert ev.npos == 1 and ev.ap == 0.0 and len(ev.precision) == 0
    assert run_fast({"a": [(GT_BOX, False)]}, [], metric="area").ap == 0.0


def _chain(pattern: str, npos: int):
    """A detection list whose TP/FP sequence is ``pattern`` ('T'/'F'), over npos one-box images."""
    records = {f"im{k}": [(GT_BOX, False)] for k in range(npos)}
    records["empty"] = []
    dets, next_gt = [], 0
    for rank, kind in enumerate(pattern):
        score = 1.0 - rank / 100
        if kind == "T":
            dets.append((f"im{next_gt}", score, GT_BOX))
            next_gt += 1
        else:
            dets.append(("empty", score, GT_BOX))
    return records, dets


def test_recall_exactly_03_does_not_reach_threshold_030000000000000004():
    # npos 10: T T T F F T -> rec .1 .2 .3 .3 .3 .4, prec 1 1 1 3/4 3/5 4/6.
    records, dets = _chain("TTTFFT", 10)
    ev = run_fast(records, dets)
    assert ev.recall[2] == 0.3 and ev.recall[2] < VOC07_RECALL_THRESHOLDS[3]
    # t = 0, .1, .2 -> 1; t = 0.30000000000000004 and 0.4 -> only rec .4 qualifies -> 4/6; t >= .5 -> 0
    expected = (1 + 1 + 1 + 4 / 6 + 4 / 6) / 11
    assert ev.ap == pytest.approx(expected, abs=1e-15)
    assert ev.ap != pytest.approx((1 + 1 + 1 + 1 + 4 / 6) / 11, abs=1e-6)  # what counting rec .3 would give


def test_recall_exactly_07_and_06_miss_thresholds_k_times_a_tenth():
    # npos 10: 7 T, F, F, T -> rec .7 with prec 1, then .8 with prec 8/10. t = 7*0.1 = 0.7000000000000001 is above
    # 7/10 = 0.7, so it sees only precision 8/10 (MATLAB's colon, 1 - 3*0.1 = 0.7, would see 1).
    records, dets = _chain("TTTTTTTFFT", 10)
    ev = run_fast(records, dets)
    assert ev.recall[6] == 0.7 < VOC07_RECALL_THRESHOLDS[7]
    expected = (7 * 1 + 0.8 + 0.8) / 11  # t = 0 .. 0.6000000000000001 -> 1, t = .7000000000000001, .8 -> .8
    assert ev.ap == pytest.approx(expected, abs=1e-15)
    assert ev.ap == pytest.approx(ap_of_thresholds(list(zip(ev.recall, ev.precision))), abs=1e-15)
    # the same for 6/10 = 0.6 < 6*0.1: npos 10, 6 T, F, F, T -> t = 0.6000000000000001 sees only rec .7 (7/9)
    records, dets = _chain("TTTTTTFFT", 10)
    ev = run_fast(records, dets)
    assert ev.ap == pytest.approx((6 * 1 + 7 / 9) / 11, abs=1e-15)


def test_iou_exactly_half_is_a_match():
    records = {"a": [(GT_BOX, False)]}
    assert run_fast(records, [("a", 1.0, (1, 1, 10, 5))]).tp.tolist() == [1]  # 50 / 100 (devkit +1 areas)
    assert run_fast(records, [("a", 1.0, (1, 1, 20, 10))]).tp.tolist() == [1]  # 100 / 200
    assert run_fast(records, [("a", 1.0, (1, 1, 10, 4.9))]).tp.tolist() == [0]  # 49 / 100
    # fractional comp4 coordinates (one decimal): 10 x 5.5 = 55 of 110
    assert run_fast({"a": [((1, 1, 10, 11), False)]}, [("a", 1.0, (1, 1, 10, 5.5))]).tp.tolist() == [1]


def test_iou_uses_the_devkits_float_operations():
    # Exactly half in real numbers (16.8 x 47.5 = 798 inside a 21 x 76 = 1596 box), but the devkit's
    # 17.2 - 1.4 + 1 rounds so that its IoU is 0.49999999999999994: a false positive in VOCevaldet.m.
    # The same formula on 0-based coordinates (min(x2) - max(x1), no +1) would give exactly 0.5 and a match.
    gt_box, det = (1, 281, 21, 356), (1.4, 284.5, 17.2, 331.0)
    ref = run_reference({"a": [(gt_box, False)]}, [("a", 1.0, det)])
    assert ref[3] == [0] and ref[4] == [1]
    ev = run_fast({"a": [(gt_box, False)]}, [("a", 1.0, det)])
    assert ev.tp.tolist() == [0] and ev.fp.tolist() == [1]


def test_unknown_image_is_an_error_naming_the_file():
    with pytest.raises(InputError, match=r"dets\.txt.*'zzz'"):
        evaluate_class(make_gt({"a": [(GT_BOX, False)]}), ["a", "zzz"], np.array([1.0, 0.5]),
                       voc_to_boxes(np.array([GT_BOX, GT_BOX], dtype=float)), source="dets.txt")


def test_area_ap_by_hand():
    # rec [.5 .5 1], prec [1 .5 2/3]: envelope 1 up to recall .5, then 2/3 -> .5 * 1 + .5 * 2/3
    records = {"a": [(GT_BOX, False)], "b": [(GT_BOX, False)], "c": []}
    ev = run_fast(records, [("a", 0.9, GT_BOX), ("c", 0.8, GT_BOX), ("b", 0.7, GT_BOX)], metric="area")
    assert ev.ap == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)
    assert voc07_ap(ev.recall, ev.precision, 2) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-15)
    assert area_ap(np.array([1.0]), np.array([1.0]), 1) == 1.0


def test_evaluate_detections_means_over_all_classes():
    classes = ("cat", "dog", "cow")
    anns = [Annotation("a", 20, 20, voc_to_boxes(np.array([GT_BOX, FAR_BOX], dtype=float)),
                       np.array([0, 1]), np.array([False, False])),
            Annotation("b", 20, 20, voc_to_boxes(np.array([GT_BOX], dtype=float)), np.array([1]), np.array([True]))]
    dets = {"cat": Detections(["a"], np.array([0.5]), voc_to_boxes(np.array([GT_BOX], dtype=float))),
            "dog": Detections(["b", "a"], np.array([0.9, 0.1]), voc_to_boxes(np.array([GT_BOX, GT_BOX], dtype=float)))}
    out = evaluate_detections(anns, classes, dets)
    assert out["npos"] == {"cat": 1, "dog": 1, "cow": 0}
    assert out["ap"]["cat"] == pytest.approx(1.0) and out["ap"]["cow"] == 0.0
    assert out["ap"]["dog"] == 0.0  # ignored (difficult), then an FP on the cat box
    assert out["mAP"] == pytest.approx(1.0 / 3)
    assert set(out["curves"]) == set(classes)


# -- fast vs reference -----------------------------------------------------------------------------------------------
def _random_case(rng: np.random.Generator):
    """Small integer-grid boxes (many exact IoU ties and 0.5s), one-decimal detections, tied scores."""
    n_images = int(rng.integers(1, 6))
    records = {}
    for k in range(n_images):
        objs = []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.integers(1, 12, size=2)
            w, h = rng.integers(1, 10, size=2)
            objs.append(((int(x1), int(y1), int(x1 + w), int(y1 + h)), bool(rng.random() < 0.3)))
        records[f"im{k}"] = objs
    ids = list(records)
    dets = []
    for _ in range(int(rng.integers(0, 16))):
        image_id = ids[int(rng.integers(len(ids)))]
        objs = records[image_id]
        if objs and rng.random() < 0.6:
            box = np.array(objs[int(rng.integers(len(objs)))][0], dtype=float)
            if rng.random() < 0.5:
                box = box + rng.integers(-2, 3, size=4)
            if rng.random() < 0.3:
                box = box + np.round(rng.uniform(-1, 1, size=4), 1)
        else:
            x1, y1 = rng.integers(1, 14, size=2)
            box = np.array([x1, y1, x1 + rng.integers(0, 10), y1 + rng.integers(0, 10)], dtype=float)
        box = np.round(box, 1)
        box[2:] = np.maximum(box[2:], box[:2])
        score = float(rng.integers(0, 4)) / 4 if rng.random() < 0.5 else round(float(rng.random()), 2)
        dets.append((image_id, score, tuple(box.tolist())))
    return records, dets


def _assert_same(fast, ref, tol, compare_ap=True):
    ap, rec, prec, tp, fp = ref
    assert fast.tp.tolist() == tp and fast.fp.tolist() == fp
    np.testing.assert_array_equal(fast.recall, np.array(rec, dtype=float))
    np.testing.assert_array_equal(fast.precision, np.array(prec, dtype=float))
    if not compare_ap:
        return
    if math.isnan(ap):
        assert math.isnan(fast.ap)
    else:
        assert abs(fast.ap - ap) <= tol


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_fast_matches_literal_vocevaldet_on_random_cases(metric):
    rng = np.random.default_rng(7)
    seen = {"tp": 0, "ignored": 0, "dup": 0, "nan": 0}
    for _ in range(400):
        records, dets = _random_case(rng)
        fast, ref = run_fast(records, dets, metric), run_reference(records, dets, metric)
        no_positives = fast.npos == 0
        if metric == "area" and no_positives:
            assert fast.ap == 0.0  # documented choice; VOCap itself gives NaN here when there are detections
        _assert_same(fast, ref, 1e-12, compare_ap=not (metric == "area" and no_positives))
        seen["tp"] += int(fast.tp.sum())
        seen["ignored"] += int(((fast.tp == 0) & (fast.fp == 0)).sum())
        seen["dup"] += int(sum(1 for d in dets for e in dets if d is not e and d[0] == e[0] and d[2] == e[2]) > 0)
        seen["nan"] += int(math.isnan(fast.ap))
    # the generator does exercise every branch of the matching
    assert seen["tp"] > 100 and seen["ignored"] > 20 and seen["dup"] > 20, seen


def test_fast_matches_reference_on_official_voc07_test_annotations(tmp_path):
    """All 4952 official VOC2007 test annotations, 20 classes, synthetic detections written to and read back from
    comp4 files: the reference parses the text like textread, the fast path goes through read_comp4."""
    if not (VOC_TEST_ROOT / "VOC2007" / "ImageSets" / "Main" / "test.txt").exists():
        pytest.skip(f"no VOC2007 test annotations at {VOC_TEST_ROOT}")
    from stages.core.boxes import clip_boxes
    from stages.core.voc import VocDataset, boxes_to_voc

    dataset = VocDataset(VOC_TEST_ROOT)
    anns = dataset.annotations("test")
    assert len(anns) == 4952
    rng = np.random.default_rng(2007)
    rows_by_class = {name: [] for name in dataset.classes}
    for ann in anns:  # 0-2 jittered copies of every box: true positives, duplicates, misses
        copies = rng.integers(0, 3, size=len(ann))
        for box, label, n in zip(ann.boxes, ann.labels, copies):
            w, h = box[2] - box[0], box[3] - box[1]
            moved = clip_boxes(box + rng.normal(0, 0.08, size=(n, 4)) * [w, h, w, h], ann.width, ann.height)
            rows_by_class[dataset.classes[label]] += [(ann.image_id, round(float(rng.random()), 3), m) for m in moved]
    per_class = {}
    for name, rows in rows_by_class.items():
        for ann in (anns[i] for i in rng.integers(len(anns), size=300)):  # background boxes
            x1, y1 = rng.uniform(0, ann.width - 10), rng.uniform(0, ann.height - 10)
            rows.append((ann.image_id, round(float(rng.random()) * 0.8, 3),
                         np.array([x1, y1, rng.uniform(x1 + 5, ann.width), rng.uniform(y1 + 5, ann.height)])))
        path = write_comp4(tmp_path, "test", name, [rows[i] for i in rng.permutation(len(rows))])
        per_class[name] = read_comp4(path)
    fast = evaluate_detections(anns, dataset.classes, per_class)
    assert sum(fast["npos"].values()) == 12032  # the official number of non-difficult VOC07 test objects
    gtids = [a.image_id for a in anns]
    recs_by_class = [[([], []) for _ in anns] for _ in dataset.classes]  # devkit boxes and flags, plain floats
    for i, ann in enumerate(anns):
        for box, label, difficult in zip(boxes_to_voc(ann.boxes).tolist(), ann.labels.tolist(),
                                         ann.difficult.tolist()):
            recs_by_class[label][i][0].append(box)
            recs_by_class[label][i][1].append(difficult)
    for k, name in enumerate(dataset.classes):
        recs = recs_by_class[k]
        lines = [line.split() for line in (tmp_path / f"comp4_det_test_{name}.txt").read_text().splitlines()]
        ref = reference_voc_evaldet(gtids, recs, [p[0] for p in lines], [float(p[1]) for p in lines],
                                    [[float(v) for v in p[2:]] for p in lines])
        ev = fast["evals"][name]
        assert ev.tp.tolist() == ref[3] and ev.fp.tolist() == ref[4], name
        assert abs(ev.ap - ref[0]) <= 1e-9, name
        assert 0.05 < ev.ap < 1.0, name  # the synthetic detections make a non-trivial curve
