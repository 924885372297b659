"""Config, artifacts/manifests, the box convention and the VOC reader: hand-computed values and error paths."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from stages.core import boxes as B
from stages.core.artifacts import Run, read_manifest
from stages.core.config import Config, build_config, merge
from stages.core.errors import InputError, SppError, StageInputMissing
from stages.core.runconfig import parse_sets, resolve_config, save_run_config
from stages.core.voc import (VocDataset, boxes_to_voc, read_comp4, resolve_voc_root, voc_to_boxes, write_comp4)


# -- boxes ----------------------------------------------------------------------------------------------------
def test_iou_of_nested_boxes_is_a_quarter():
    assert B.box_iou([[0, 0, 10, 10]], [[0, 0, 5, 5]])[0, 0] == pytest.approx(0.25)


def test_box_iou_matches_torchvision_on_random_and_degenerate_boxes():
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2))
    a = np.hstack([xy, xy + rng.uniform(0, 30, (200, 2))])
    a[:5, 2:] = a[:5, :2]  # zero-area boxes: IoU 0 with every box of positive area
    b = a[::-1][:150] + rng.normal(0, 3, (150, 4))
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 0.5)  # valid boxes (x2 > x1), overlapping a in every way
    ours = B.box_iou(a, b)
    ref = tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert ours.shape == (200, 150) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
    assert (ours[:5] == 0).all() and 0 < ours.max() <= 1
    assert B.box_iou(np.zeros((0, 4)), b).shape == (0, 150)
    # paired_iou is the diagonal of the matrix, without building it.
    np.testing.assert_allclose(B.paired_iou(a[:150], b), np.diag(ref[:150]), rtol=0, atol=1e-15)
    # By hand: [0,0,10,10] vs [5,0,15,10] overlap 5 x 10 = 50 of a union of 150; disjoint boxes give 0.
    assert B.paired_iou(np.array([[0, 0, 10, 10.], [0, 0, 1, 1]]), np.array([[5, 0, 15, 10.], [2, 2, 3, 3]])
                        ).tolist() == pytest.approx([1 / 3, 0.0], abs=1e-15)


def test_voc_conversion_gives_the_devkit_plus_one_iou():
    # Devkit: boxes (1,1,10,10) and (6,1,15,10): iw = 10-6+1 = 5, ih = 10; union = 100+100-50 -> 1/3.
    a, b = voc_to_boxes([[1, 1, 10, 10]]), voc_to_boxes([[6, 1, 15, 10]])
    assert B.box_iou(a, b)[0, 0] == pytest.approx(50 / 150, abs=1e-15)
    assert np.array_equal(boxes_to_voc(a), [[1, 1, 10, 10]])


def test_bbox_targets_round_trip():
    rng = np.random.default_rng(1)
    p = np.sort(rng.random((50, 4)) * 100, axis=1)[:, [0, 1, 2, 3]]
    p = np.stack([p[:, 0], p[:, 1], p[:, 0] + 5 + p[:, 2], p[:, 1] + 5 + p[:, 3]], axis=1)
    g = p + rng.normal(0, 3, p.shape)
    g[:, 2:] = np.maximum(g[:, 2:], g[:, :2] + 1)
    assert np.allclose(B.apply_bbox_deltas(p, B.bbox_targets(p, g)), g, atol=1e-9)


def test_flip_is_the_devkit_flip_and_an_involution():
    box = voc_to_boxes([[1, 5, 10, 20]])  # devkit flip of x in [1,10] on W=100: [91, 100]
    assert np.array_equal(boxes_to_voc(B.flip_boxes(box, 100)), [[91, 5, 100, 20]])
    assert np.array_equal(B.flip_boxes(B.flip_boxes(box, 100), 100), box)


def test_nms_suppresses_above_threshold_only():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 13], [0, 0, 10, 20], [50, 50, 60, 60]], dtype=float)
    keep = B.nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.5)  # IoU(0,1)=10/13 > .5; IoU(0,2)=0.5 stays
    assert keep.tolist() == [0, 2, 3]


def test_nms_is_torchvisions_kernel_loaded_without_torchvision():
    # boxes.nms calls torchvision's compiled kernel directly (core.vision_ops): the same indices as
    # torchvision.ops.nms, ties in score included (twin windows share a score), on float64 boxes.
    from torchvision.ops import nms as torchvision_nms

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 400))
        x1, y1 = rng.uniform(0, 300, n), rng.uniform(0, 200, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, 120, n), y1 + rng.uniform(1, 120, n)], axis=1)
        boxes[rng.random(n) < 0.2] = boxes[0]  # duplicates
        scores = np.round(rng.normal(size=n), 1 if trial % 2 else 6)  # many ties, or few
        expected = torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3).numpy()
        np.testing.assert_array_equal(B.nms(boxes, scores, 0.3), expected)


def test_nms_top_is_the_full_nms_cut_at_the_limit(monkeypatch):
    # the top-scoring prefix NMS runs on must give the same boxes as NMS on all of them, ties in score included,
    # whether the first prefix is enough, it has to grow, or it grows to every box
    full_nms = B.nms
    prefixes = []
    monkeypatch.setattr(B, "nms", lambda boxes, scores, iou: prefixes.append(len(scores)) or full_nms(boxes, scores, iou))
    rng = np.random.default_rng(1)
    seen = set()
    for trial in range(60):
        n = int(rng.integers(0, 3000))
        (width, height), (small, large) = ((500, 400), (1, 200)) if trial % 3 else ((300, 200), (30, 150))
        x1, y1 = rng.uniform(0, width, n), rng.uniform(0, height, n)  # spread out, or crowded (few kept)
        boxes = np.stack([x1, y1, x1 + rng.uniform(small, large, n), y1 + rng.uniform(small, large, n)], axis=1)
        boxes[rng.random(n) < 0.1] = boxes[0] if n else boxes[:0]  # duplicates
        scores = np.round(rng.normal(size=n), 1 if trial % 2 else 8)  # many ties, or few
        for limit in (1, 5, 60, 100, 4000):
            expected = full_nms(boxes, scores, 0.3)[:limit]
            prefixes.clear()
            np.testing.assert_array_equal(B.nms_top(boxes, scores, 0.3, limit), expected)
            seen.add((len(prefixes) > 1, len(expected) == limit, bool(prefixes) and prefixes[-1] < n))
    assert {(False, True, True), (True, True, True), (True, False, False)} <= seen
    assert B.nms_top(np.zeros((3, 4)), np.zeros(3), 0.3, 0).tolist() == []
    with pytest.raises(ValueError):
        B.nms_top(np.zeros((3, 4)), np.zeros(3), 0.3, -1)
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=float)
    for scores in ([1.0, 2.0, np.nan], [np.nan, np.nan, 0.0]):
        np.testing.assert_array_equal(B.nms_top(boxes, scores, 0.3, 2), full_nms(boxes, np.array(scores), 0.3)[:2])


# -- config ---------------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(SppError, match="unknown config key 'finetune.iterz'"):
        merge(Config(), {"finetune": {"iterz": 3}})
    with pytest.raises(SppError, match="expected an integer"):
        merge(Config(), {"finetune": {"iters": "many"}})
    cfg = merge(Config(), {"features": {"scales": [688]}, "svm": {"C": 1}})
    assert cfg.features.scales == (688,) and cfg.svm.C == 1.0
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen
    with pytest.raises(SppError, match="config svm.pruning: 'overlap' is not one of dedup, overlap70, none"):
        merge(Config(), {"svm": {"pruning": "overlap"}})
    assert merge(Config(), {"detect": {"fc_dtype": "bfloat16"}}).detect.fc_dtype == "bfloat16"


def test_a_refused_set_is_not_saved_in_the_run_config(tmp_path):
    save_run_config(resolve_config(None, {"run": "r", "runs_root": str(tmp_path)}, ["pretrain.optimizer=adamw"]))
    with pytest.raises(SppError, match="pretrain.optimizer: 'adam' is not one of sgd, adamw"):
        resolve_config(None, {"run": "r", "runs_root": str(tmp_path)}, ["pretrain.optimizer=adam"])
    assert resolve_config(None, {"run": "r", "runs_root": str(tmp_path)}, []).pretrain.optimizer == "adamw"


def test_presets_load_and_sets_parse():
    for name in ("synth", "voc2007-zf5", "voc2007-mobilenet"):
        build_config(name)
    assert parse_sets(["finetune.iters=5", "features.scales=[688, 480]", "model.backbone=zf5"]) == {
        "finetune.iters": 5, "features.scales": [688, 480], "model.backbone": "zf5"}


def test_resolve_config_writes_nothing_and_a_saved_config_is_reused(tmp_path):
    cfg = resolve_config(None, {"run": "r", "runs_root": str(tmp_path)}, ["finetune.iters=7", "svm.workers=3"])
    assert cfg.finetune.iters == 7 and cfg.svm.workers == 3 and not (tmp_path / "r").exists()
    save_run_config(cfg)  # what the stage runner does when a stage runs
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "workers" not in saved["svm"] and "device" not in saved  # machine settings are not saved
    again = resolve_config(None, {"run": "r", "runs_root": str(tmp_path)}, [])
    assert again.finetune.iters == 7 and again.svm.workers == 0 and again == dataclasses.replace(
        cfg, svm=dataclasses.replace(cfg.svm, workers=0))


# -- artifacts ------------------------------------------------------------------------------------------------
def test_manifest_missing_stale_and_fresh(tmp_path):
    run = Run(tmp_path / "run")
    with pytest.raises(StageInputMissing, match=r"run `spp proposals --run run --runs-root \S+ --split test` first"):
        run.require("proposals", "test")
    out = run.stage_dir("proposals", "test")
    out.mkdir(parents=True)
    (out / "p.h5").write_bytes(b"x")
    up = run.write_manifest("proposals", "test", config={"a": 1}, inputs={"dataset": "abc"},
                            outputs={"proposals": out / "p.h5"})
    assert read_manifest(up.path).output("proposals") == out / "p.h5"
    down_dir = run.stage_dir("features", "test")
    down_dir.mkdir(parents=True)
    (down_dir / "f.h5").write_bytes(b"y")
    run.write_manifest("features", "test", config={}, inputs={"proposals": up}, outputs={"features": "f.h5"})
    assert run.require("features", "test")  # fresh
    assert run.is_up_to_date("features", "test", {}, {"proposals": up})
    # upstream reruns with another config: downstream is stale and says what to rerun
    run.write_manifest("proposals", "test", config={"a": 2}, inputs={"dataset": "abc"}, outputs={"proposals": "p.h5"})
    with pytest.raises(StageInputMissing, match=r"stale input.*proposals.*rerun `spp extract-features --run run --runs-root \S+ --split test`"):
        run.require("features", "test")


def test_manifest_refuses_undeclared_outputs(tmp_path):
    run = Run(tmp_path)
    run.stage_dir("finetune").mkdir(parents=True)
    with pytest.raises(SppError, match="did not write it"):
        run.write_manifest("finetune", None, config={}, inputs={}, outputs={"model": "model.pt"})
    assert not run.manifest_path("finetune").exists()


def test_stage_tags_cannot_escape_the_run(tmp_path):
    with pytest.raises(SppError, match="invalid stage tag"):
        Run(tmp_path).stage_dir("detect", "../../etc")


# -- VOC reader -----------------------------------------------------------------------------------------------
def test_reader_converts_boxes_once_and_reads_flags(tiny_devkit):
    ds = VocDataset(tiny_devkit)
    assert ds.classes == ("red", "green") and ds.image_ids("train") == ["img0", "img1"]
    ann = ds.annotation("img2")
    assert (ann.width, ann.height) == (80, 64)
    assert np.array_equal(ann.boxes, [[12, 10, 50, 40], [55, 45, 75, 60]])
    assert ann.labels.tolist() == [0, 1] and ann.difficult.tolist() == [False, True]
    assert ds.load_image("img2").shape == (64, 80, 3)


def _xml(body: str) -> str:
    return f"<annotation><size><width>50</width><height>40</height></size>{body}</annotation>"


@pytest.mark.parametrize("body,message", [
    ("<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
     "unknown class 'cat'"),
    ("<object><name>red</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
     "max < min"),
    ("<object><name>red</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>51</xmax><ymax>5</ymax></bndbox></object>",
     "outside the 50x40 image"),
    ("<object><name>red</name><bndbox><xmin>1</xmin></bndbox></object>", "missing <ymin>"),
])
def test_bad_annotations_are_one_line_errors_naming_the_file(tiny_devkit, body, message):
    path = tiny_devkit / "VOC2007" / "Annotations" / "img0.xml"
    path.write_text(_xml(body))
    with pytest.raises(InputError, match=message) as err:
        VocDataset(tiny_devkit).annotation("img0")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content,message", [("", "malformed XML"), ("<annotation><size>", "malformed XML"),
                                             ("<!DOCTYPE x [<!ENTITY a 'b'>]><annotation/>", "malformed XML")])
def test_malformed_empty_and_entity_xml_refused(tiny_devkit, content, message):
    path = tiny_devkit / "VOC2007" / "Annotations" / "img0.xml"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        VocDataset(tiny_devkit).annotation("img0")


def test_skip_bad_warns_and_skips(tiny_devkit):
    (tiny_devkit / "VOC2007" / "Annotations" / "img0.xml").write_text("garbage")
    with pytest.warns(UserWarning, match="img0.xml"):
        assert VocDataset(tiny_devkit, skip_bad=True).usable_ids("train") == ["img1"]


def test_escaping_ids_and_empty_splits_refused(tiny_devkit):
    main = tiny_devkit / "VOC2007" / "ImageSets" / "Main"
    (main / "evil.txt").write_text("../../../etc/passwd\n")
    with pytest.raises(InputError, match="invalid image id"):
        VocDataset(tiny_devkit).image_ids("evil")
    (main / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="lists no images"):
        VocDataset(tiny_devkit).image_ids("empty")
    with pytest.raises(InputError, match="no split list 'nope'"):
        VocDataset(tiny_devkit).image_ids("nope")


def test_bad_images_are_one_line_errors(tiny_devkit):
    jpg = tiny_devkit / "VOC2007" / "JPEGImages" / "img0.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="img0.jpg.*(corrupt|truncated)"):
        VocDataset(tiny_devkit).load_image("img0")
    jpg.unlink()
    with pytest.raises(InputError, match="missing image"):
        VocDataset(tiny_devkit).load_image("img0")


def test_grey_png_and_cmyk_images_decode_as_rgb(tmp_path):
    from PIL import Image

    from stages.core.voc import load_image_rgb
    grey = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 90, np.uint8)).save(grey)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(cmyk)
    assert load_image_rgb(grey).shape == (5, 7, 3) and (load_image_rgb(grey) == 90).all()
    red = load_image_rgb(cmyk)
    assert red.shape == (5, 7, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60


def test_missing_voc_root_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPP_VOC_ROOT", raising=False)
    with pytest.raises(SppError, match="data/VOCdevkit.*--voc-root.*SPP_VOC_ROOT"):
        resolve_voc_root("voc2007", None)


def test_comp4_round_trip_and_errors(tmp_path):
    boxes = voc_to_boxes([[1, 2, 30, 40], [5, 5, 9, 9]])
    path = write_comp4(tmp_path, "test", "red", [("a", 0.5, boxes[0]), ("b", -1.25, boxes[1])])
    dets = read_comp4(path)
    assert dets.image_ids == ["a", "b"] and np.allclose(dets.boxes, boxes) and np.allclose(dets.scores, [0.5, -1.25])
    assert len(read_comp4(tmp_path / "absent.txt").scores) == 0
    path.write_text("a 0.5 1 2 3\n")
    with pytest.raises(InputError, match="line 1"):
        read_comp4(path)


def test_dataset_fingerprint_follows_annotation_content(tiny_devkit):
    ds = VocDataset(tiny_devkit)
    before = ds.fingerprint("train")
    path = tiny_devkit / "VOC2007" / "Annotations" / "img1.xml"
    path.write_text(path.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    assert VocDataset(tiny_devkit).fingerprint("train") != before
    assert json.dumps(before)


def test_manifest_outputs_with_a_relative_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Run("data/runs/r")  # relative, as `make all` uses it
    folder = run.stage_dir("pretrain")
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"w")
    manifest = run.write_manifest("pretrain", None, config={}, inputs={}, outputs={"model": folder / "model.pt"})
    assert manifest.data["outputs"]["model"] == "model.pt"
    assert manifest.output("model").read_bytes() == b"w"


def test_conv_source_tags_share_one_suffix():
    from stages.core.registry import conv_suffix
    from stages.core.features import features_tag
    from stages.core.registry import bbox_tag

    assert (features_tag("trainval"), features_tag("trainval", "finetune")) == ("trainval", "trainval+ftconv")
    assert (bbox_tag(True, 5), bbox_tag(False, 5, "finetune")) == ("s1", "s5+ftconv")
    for make_tag in (conv_suffix, lambda c: features_tag("test", c), lambda c: bbox_tag(False, 5, c)):
        with pytest.raises(SppError, match="conv5 maps come from 'pretrain' or 'finetune', not 'scratch'"):
            make_tag("scratch")
