"""Robustness (issue #6): bad inputs give one clear line naming the file, no finished work is lost, nothing is
written outside the run directory, and awkward but valid inputs (no proposals, sub-cell windows, a 12-megapixel
image, PNG / grey / CMYK / 16-bit pixels) work.

Cases tested where they belong are not repeated here: the reader's own checks (test_core), kill-and-resume of
extract-features / proposals / pretrain (test_features, test_proposals, test_pretrain), damaged feature chunks
(test_features), cell mapping of degenerate windows (test_spp). Everything here runs on tiny generated data.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sppcli.cli import cli
from stages import detect, extract_features, finetune, proposals, train_bbox, train_svm
from stages.core import nets, spp
from stages.core.artifacts import Run
from stages.core.bboxreg import load_bbox_model
from stages.core.config import build_config
from stages.core.errors import InputError, SppError
from stages.core.features import features_for, read_header
from stages.core.proposals import best_overlaps, load_proposals
from stages.core.svm import load_svm_model
from stages.core.voc import VocDataset

from conftest import jittered_and_random_proposals, write_devkit
from test_pretrain import make_tree


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size, mtime and content hash (folders: None)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file():
            out[key] = (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[key] = None
    return out


def one_line_error(result) -> str:
    """The CLI's error output, checked to be exactly one ``error: ...`` line and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # (progress bars end with \r)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def fake_checkpoint(run: Run, stage: str, backbone: str = "zf5", num_classes: int = 3, seed: int = 0) -> Path:
    """A random-weight SppNet saved as the run's finished ``stage`` (pretrain or finetune)."""
    torch.manual_seed(seed)
    net = nets.build_sppnet(backbone, fc_dim=32, num_classes=num_classes)
    for layer in (net.head.fc6, net.head.fc7):  # wider than N(0, 0.01) so that fc features are not all ~0
        torch.nn.init.normal_(layer.weight, 0.0, 0.05)
    folder = run.stage_dir(stage)
    folder.mkdir(parents=True, exist_ok=True)
    nets.save_checkpoint(folder / "model.pt", net, {})
    run.write_manifest(stage, None, config={"test": stage, "seed": seed}, inputs={}, outputs={"model": "model.pt"})
    return folder / "model.pt"


# -- bad inputs through the CLI: one line naming the file, no manifest, the dataset untouched ----------------------
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol1 "lol">'
                  + "".join(f'<!ENTITY lol{k} "' + f"&lol{k - 1};" * 10 + '">' for k in range(2, 10))
                  + "]><annotation><folder>&lol9;</folder></annotation>")
XXE = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>'


def _object_xml(name: str, box: tuple[int, int, int, int]) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<annotation><size><width>80</width><height>64</height><depth>3</depth></size><object><name>{name}"
            f"</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
            "</object></annotation>")


def _break(voc: Path, case: str) -> tuple[Path, str]:
    """Damage the tiny devkit (img1 of split train) as ``case`` says; returns (the file the error must name,
    a regex of the problem)."""
    jpg, xml = voc / "JPEGImages" / "img1.jpg", voc / "Annotations" / "img1.xml"
    split = voc / "ImageSets" / "Main" / "train.txt"
    if case == "truncated jpeg":
        jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
        return jpg, "corrupt|truncated"
    if case == "jpeg cut by one byte":
        jpg.write_bytes(jpg.read_bytes()[:-1])
        return jpg, "corrupt|truncated"
    if case == "garbage jpeg":
        jpg.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
        return jpg, "corrupt or unsupported image"
    if case == "missing image":
        jpg.unlink()
        return jpg, "missing image"
    if case == "png instead of jpg":
        cv2.imwrite(str(jpg.with_suffix(".png")), cv2.imread(str(jpg)))
        jpg.unlink()
        return jpg, r"missing image \(there is img1\.png"
    if case == "malformed xml":
        xml.write_text("<annotation><size><width>80</width>")
        return xml, "malformed XML"
    if case == "empty xml":
        xml.write_text("")
        return xml, "malformed XML"
    if case == "missing xml":
        xml.unlink()
        return xml, "missing annotation"
    if case == "billion laughs":
        xml.write_text(BILLION_LAUGHS)
        return xml, "malformed XML.*DTDForbidden"
    if case == "external entity":
        xml.write_text(XXE)
        return xml, "malformed XML.*DTDForbidden"
    if case == "unknown class":
        xml.write_text(_object_xml("cat", (10, 10, 30, 30)))
        return xml, "unknown class 'cat'"
    if case == "xmax < xmin":
        xml.write_text(_object_xml("red", (30, 10, 20, 30)))
        return xml, r"box \(30,10,20,30\) of 'red' has max < min"
    if case == "box outside the image":
        xml.write_text(_object_xml("red", (10, 10, 81, 30)))
        return xml, r"box \(10,10,81,30\) of 'red' lies outside the 80x64 image"
    if case == "escaping image id":
        split.write_text("img0\n../../../../etc/passwd\n")
        return split, r"invalid image id '\.\./\.\./\.\./\.\./etc/passwd'"
    if case == "empty split list":
        split.write_text("\n")
        return split, "split 'train' lists no images"
    raise ValueError(case)


BAD_INPUTS = ["truncated jpeg", "jpeg cut by one byte", "garbage jpeg", "missing image", "png instead of jpg",
              "malformed xml", "empty xml", "missing xml", "billion laughs", "external entity", "unknown class",
              "xmax < xmin", "box outside the image", "escaping image id", "empty split list"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_cli_line_naming_the_file(tiny_devkit, tmp_path, case):
    named, problem = _break(tiny_devkit / "VOC2007", case)
    before = snapshot(tiny_devkit)
    result = CliRunner().invoke(cli, ["proposals", "--split", "train", "--run", "r", "--runs-root",
                                      str(tmp_path / "runs"), "--dataset", "voc2007", "--voc-root", str(tiny_devkit),
                                      "--set", "proposals.workers=1"])
    line = one_line_error(result)
    assert line.startswith(f"error: {named}: ") and re.search(problem, line), line
    assert not Run(tmp_path / "runs" / "r").manifest_path("proposals", "train").exists()
    assert snapshot(tiny_devkit) == before  # nothing written into the dataset


def test_split_names_cannot_escape_the_dataset_either(tiny_devkit, tmp_path):
    with pytest.raises(InputError, match="invalid split name"):
        VocDataset(tiny_devkit).image_ids("../../../../etc/passwd")
    result = CliRunner().invoke(cli, ["proposals", "--split", "../../Main/train", "--runs-root", str(tmp_path),
                                      "--dataset", "voc2007", "--voc-root", str(tiny_devkit)])
    assert "invalid split name '../../Main/train'" in one_line_error(result)


def test_billion_laughs_is_refused_before_any_expansion(tiny_devkit):
    xml = tiny_devkit / "VOC2007" / "Annotations" / "img0.xml"
    xml.write_text(BILLION_LAUGHS)  # 10^8 "lol"s when expanded
    with pytest.raises(InputError, match="DTDForbidden") as err:
        VocDataset(tiny_devkit).annotation("img0")
    assert str(xml) in str(err.value) and len(str(err.value)) < 300


# -- no finished work lost after an error -----------------------------------------------------------------------------
def test_an_error_keeps_the_finished_images_and_the_rerun_completes_the_rest(tiny_devkit, tmp_path):
    voc = tiny_devkit / "VOC2007"
    (voc / "ImageSets" / "Main" / "all.txt").write_text("img0\nimg1\nimg2\n")
    jpg = voc / "JPEGImages" / "img1.jpg"
    good = jpg.read_bytes()
    jpg.write_bytes(good[:200])
    cfg = build_config(None, {"runs_root": str(tmp_path), "data.dataset": "voc2007", "data.voc_root": str(tiny_devkit),
                              "proposals.workers": 1, "proposals.min_side": 8, "device": "cpu",
                              "features.scales": [64], "model.fc_dim": 32})
    run = Run(cfg.run_dir)
    with pytest.raises(InputError, match=r"img1\.jpg"):
        proposals.run(cfg, "all")
    assert [p.name for p in (run.stage_dir("proposals", "all") / "partial").glob("*.npy")] == ["img0.npy"]
    jpg.write_bytes(good)  # the user fixes the image and reruns
    result = proposals.run(cfg, "all")
    assert result.manifest.metrics["images_reused"] == 1 and result.manifest.metrics["images_computed"] == 2

    fake_checkpoint(run, "pretrain")
    jpg.write_bytes(good[:200])
    with pytest.raises(InputError, match=r"img1\.jpg"):
        extract_features.run(cfg, "all")
    jpg.write_bytes(good)
    result = extract_features.run(cfg, "all")
    assert result.extra["computed_ids"] == ["img1", "img2"] and result.manifest.metrics["images_resumed"] == 1


def test_a_full_disk_stops_before_writing_keeps_finished_images_and_is_one_cli_line(tiny_devkit, tmp_path,
                                                                                      monkeypatch):
    """HDF5 cannot survive a write that fails for lack of space (closing the file afterwards can crash the
    process), so writers check the free space first: the stage stops with one line naming the file, the images
    already written are kept, and the rerun with space completes the rest."""
    import shutil

    from stages.core import errors

    voc = tiny_devkit / "VOC2007"
    (voc / "ImageSets" / "Main" / "all.txt").write_text("img0\nimg1\nimg2\n")
    sets = {"runs_root": str(tmp_path), "data.dataset": "voc2007", "data.voc_root": str(tiny_devkit),
            "proposals.workers": 1, "proposals.min_side": 8, "device": "cpu", "features.scales": [64],
            "model.fc_dim": 32}
    cfg = build_config(None, sets)
    run = Run(cfg.run_dir)
    proposals.run(cfg, "all")
    fake_checkpoint(run, "pretrain")

    real_usage = shutil.disk_usage
    checks = []

    def one_image_of_space(path):  # room for the first image's maps, then the disk is full
        usage = real_usage(path)
        checks.append(path)
        free = errors.DISK_MARGIN_BYTES + (1 << 20) if len(checks) == 1 else errors.DISK_MARGIN_BYTES
        return usage._replace(free=free)

    monkeypatch.setattr(errors.shutil, "disk_usage", one_image_of_space)
    partial = run.stage_dir("features", "all")
    with pytest.raises(errors.DiskFull, match=r"features.*partial\.h5: not enough disk space for the conv5 maps of "
                                              r"image img1: .* MiB to write"):
        extract_features.run(cfg, "all")
    monkeypatch.setattr(errors.shutil, "disk_usage", real_usage)
    assert [p.name for p in partial.glob("*.partial.h5")]  # the finished image is kept
    result = extract_features.run(cfg, "all")
    assert result.extra["computed_ids"] == ["img1", "img2"] and result.manifest.metrics["images_resumed"] == 1

    # Through the CLI: one line, exit 1; proposals' own write is checked the same way.
    monkeypatch.setattr(errors, "DISK_MARGIN_BYTES", 1 << 62)
    args = ["proposals", "--runs-root", str(tmp_path), "--run", "other", "--dataset", "voc2007", "--voc-root",
            str(tiny_devkit), "--split", "all", "--set", "proposals.workers=1", "--set", "proposals.min_side=8"]
    line = one_line_error(CliRunner().invoke(cli, args))
    assert re.fullmatch(r"error: \S+proposals\.h5\.tmp: not enough disk space for the proposals of image img0: .*", line)
    assert not list((tmp_path / "other").rglob("*.h5"))


def test_disk_full_errors_from_the_os_and_from_hdf5_read_as_one_line():
    import errno as errno_module

    from stages.core.errors import disk_full_message

    assert disk_full_message(OSError(errno_module.ENOSPC, "No space left on device", "/runs/a/out.pt")) == (
        "/runs/a/out.pt: no space left on device; free some space and rerun the same command (finished work is kept)")
    hdf5 = RuntimeError("Can't decrement id ref count (file write failed: time = Sat Nov 21 20:19:28 2026\n, "
                        "filename = '/runs/a/x.h5', file descriptor = 3, errno = 28, error message = 'No space left "
                        "on device', buf = 0x1)")
    assert disk_full_message(hdf5).startswith("/runs/a/x.h5: no space left on device;")
    assert disk_full_message(OSError(errno_module.EACCES, "Permission denied")) is None
    assert disk_full_message(RuntimeError("something else")) is None


# -- truncated HDF5 files ---------------------------------------------------------------------------------------------
def test_truncated_hdf5_is_one_line_naming_the_command_and_that_command_rebuilds_it(tiny_devkit, tmp_path):
    cfg = build_config(None, {"runs_root": str(tmp_path), "data.dataset": "voc2007", "data.voc_root": str(tiny_devkit),
                              "proposals.workers": 1, "proposals.min_side": 8, "device": "cpu",
                              "features.scales": [64], "model.fc_dim": 32})
    run = Run(cfg.run_dir)
    proposals.run(cfg, "train")
    fake_checkpoint(run, "pretrain")
    extract_features.run(cfg, "train")
    with load_proposals(run, "train") as store:
        want_boxes = {i: store.boxes(i) for i in store.image_ids}
    want_map = features_for(run, "train").maps("img1")[0]

    h5 = run.stage_dir("proposals", "train") / "proposals.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(SppError) as err:
        load_proposals(run, "train")
    message = str(err.value)  # its size is not the one the manifest recorded: caught before HDF5 reads it
    assert f"lost or changed its output {h5} " in message and "\n" not in message
    assert f"rerun `{run.command_for('proposals', 'train')}`" in message
    again = proposals.run(cfg, "train")  # the command the message names really rebuilds the file
    assert not again.skipped and again.manifest.metrics["images_computed"] == 2
    with load_proposals(run, "train") as store:
        assert all(np.array_equal(store.boxes(i), b) for i, b in want_boxes.items())

    cache = run.stage_dir("features", "train") / "features.h5"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.raises(SppError, match=r"lost or changed its output .*rerun `spp extract-features --run default "
                                       r"--runs-root \S+ --split train`") as err:
        features_for(run, "train").maps("img1")
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    rebuilt = extract_features.run(cfg, "train")
    assert not rebuilt.skipped and read_header(cache) is not None
    assert torch.equal(features_for(run, "train").maps("img1")[0], want_map)


# -- checkpoints: another backbone, pickles ---------------------------------------------------------------------------
def test_checkpoint_of_another_backbone_is_one_line_naming_the_file(tiny_devkit, tmp_path):
    cfg = build_config(None, {"runs_root": str(tmp_path), "data.dataset": "voc2007", "data.voc_root": str(tiny_devkit),
                              "device": "cpu", "model.backbone": "zf5", "features.scales": [64]})
    checkpoint = fake_checkpoint(Run(cfg.run_dir), "pretrain", backbone="mobilenet_v2")
    with pytest.raises(SppError) as err:
        extract_features.run(cfg, "train")
    assert str(err.value) == f"{checkpoint}: checkpoint is for backbone mobilenet_v2, the run uses zf5"
    # The same file given as the zf5 trunk's weights: its tensors do not fit, said in one line.
    with pytest.raises(SppError, match=r"weights do not fit the zf5 trunk") as err:
        nets.build_backbone("zf5", str(checkpoint))
    assert str(err.value).startswith(str(checkpoint)) and "\n" not in str(err.value)


class _Planted:
    """Unpickling this runs ``open(marker, "w")``: the marker file shows whether a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_bearing_checkpoint_is_refused_without_running_it(tiny_devkit, tmp_path):
    marker = tmp_path / "pickle_code_ran"
    cfg = build_config(None, {"runs_root": str(tmp_path), "data.dataset": "voc2007", "data.voc_root": str(tiny_devkit),
                              "device": "cpu", "features.scales": [64], "model.fc_dim": 32})
    run = Run(cfg.run_dir)
    path = fake_checkpoint(run, "pretrain")
    state = torch.load(path, weights_only=True)
    state["meta"]["note"] = _Planted(marker)  # a real checkpoint with one pickled object inside
    torch.save(state, path)
    run.write_manifest("pretrain", None, config={"test": "pretrain"}, inputs={}, outputs={"model": "model.pt"})
    loaders = [lambda: nets.load_checkpoint(path), lambda: nets.build_backbone("zf5", str(path)),
               lambda: extract_features.run(cfg, "train")]
    for load in loaders:
        with pytest.raises(SppError) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert "refused: it holds pickled Python objects (io.open)" in message
        assert "weights_only` set to `False" not in message  # torch's advice is not passed on
    assert not marker.exists()


# -- images: PNG, grey, CMYK, 16-bit, 12 megapixels --------------------------------------------------------------------
def test_png_grey_cmyk_and_16bit_images_flow_through_proposals_and_features(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = (rng.random((64, 80, 3)) * 60).astype(np.uint8)
    rgb[10:40, 12:50] = (200, 30, 30)
    objects = [("red", (13, 11, 50, 40), False)]
    ids = ["png", "grey", "cmyk", "grey16"]
    devkit = write_devkit(tmp_path / "devkit", {i: (rgb, objects) for i in ids}, {"all": ids}, classes=("red",))
    jpegs = devkit / "VOC2007" / "JPEGImages"
    Image.fromarray(rgb).save(jpegs / "png.jpg", format="PNG")  # PNG bytes under the VOC name
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    Image.fromarray(grey).save(jpegs / "grey.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(jpegs / "cmyk.jpg", quality=95)
    grey16 = grey.astype(np.uint16) * 257 + 100  # 16 bits; the top byte is ``grey`` (a few values + 1)
    cv2.imwrite(str(jpegs / "grey16.png"), grey16)
    (jpegs / "grey16.png").rename(jpegs / "grey16.jpg")

    dataset = VocDataset(devkit)
    assert np.array_equal(dataset.load_image("png"), rgb)
    decoded_grey = dataset.load_image("grey")
    assert (decoded_grey == decoded_grey[:, :, :1]).all()
    assert np.abs(decoded_grey[:, :, 0] - grey.astype(int)).mean() < 2
    assert np.abs(dataset.load_image("cmyk").astype(int) - rgb).mean() < 3
    decoded16 = dataset.load_image("grey16")
    assert np.array_equal(decoded16, np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2))
    assert np.abs(decoded16.astype(int) - grey[:, :, None]).max() <= 1  # not clipped to white

    cfg = build_config(None, {"runs_root": str(tmp_path / "runs"), "data.dataset": "voc2007", "device": "cpu",
                              "data.voc_root": str(devkit), "proposals.workers": 1, "proposals.min_side": 8,
                              "features.scales": [64], "model.fc_dim": 32})
    assert proposals.run(cfg, "all").manifest.metrics["images"] == 4
    fake_checkpoint(Run(cfg.run_dir), "pretrain")
    extract_features.run(cfg, "all")
    cache = features_for(Run(cfg.run_dir), "all")
    assert cache.image_ids == ids
    for image_id in ids:
        assert cache.image_hw(image_id) == (64, 80) and torch.isfinite(cache.maps(image_id)[0]).all()


def test_a_12_megapixel_image_is_shrunk_for_selective_search_and_extracted(tmp_path):
    height, width = 3000, 4000
    image = np.empty((height, width, 3), np.uint8)
    image[:] = np.linspace(40, 100, width, dtype=np.uint8)[None, :, None]
    image[600:2100, 800:2600] = (200, 30, 30)
    devkit = write_devkit(tmp_path / "devkit", {"huge": (image, [("red", (801, 601, 2600, 2100), False)])},
                          {"all": ["huge"]}, classes=("red",))
    del image
    cfg = build_config(None, {"runs_root": str(tmp_path / "runs"), "data.dataset": "voc2007", "device": "cpu",
                              "data.voc_root": str(devkit), "proposals.workers": 1, "features.scales": [96, 128],
                              "model.fc_dim": 32})
    assert cfg.proposals.max_image_side == 500  # the default: selective search runs on a 500 x 375 copy
    result = proposals.run(cfg, "all")
    assert result.manifest.metrics["recall@0.7"] == 1.0
    with load_proposals(Run(cfg.run_dir), "all") as store:
        boxes = store.boxes("huge")
    # Boxes are in the original pixels: they reach the far corner, and one matches the object tightly.
    assert boxes[:, 2].max() == width and boxes[:, 3].max() == height and boxes.min() >= 0
    assert best_overlaps(np.array([[800.0, 600, 2600, 2100]]), boxes)[0] > 0.95

    fake_checkpoint(Run(cfg.run_dir), "pretrain")
    extract_features.run(cfg, "all")
    cache = features_for(Run(cfg.run_dir), "all")
    maps = cache.maps("huge")
    assert cache.image_hw("huge") == (height, width)
    # Inputs 96 x 128 and 128 x 171 (shorter side = scale); ZF-5 conv5 sides 96 -> 5, 128 -> 7, 171 -> 9 (SPEC §1).
    assert [tuple(m.shape[1:]) for m in maps] == [(5, 7), (7, 9)]
    pooled = cache.pooled("huge", boxes[:50], (1, 2, 3, 6))
    assert pooled.shape == (50, 256 * 50) and torch.isfinite(pooled).all()


# -- windows smaller than one conv5 cell -------------------------------------------------------------------------------
def test_windows_smaller_than_one_cell_pool_to_that_cell(tmp_path):
    torch.manual_seed(0)
    backbone = nets.build_backbone("zf5").eval()
    image = (np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)
    scales = (64, 96)
    with torch.inference_mode():
        fmaps = [backbone(nets.preprocess(image, s, backbone.spec)[None])[0] for s in scales]
    boxes = np.array([
        [0, 0, 1, 1],          # one pixel, top-left corner
        [79, 63, 80, 64],      # one pixel, bottom-right corner
        [40, 30, 43, 32],      # 3 x 2 pixels in the middle
        [20.2, 20.4, 20.6, 21.0],  # sub-pixel
        [50, 10, 50, 10],      # empty (x1 == x2): still a finite, valid cell
        [0, 0, 80, 64],        # the whole image, for contrast
    ])
    pyramid = (1, 2, 3, 6)
    pooled = spp.pool_windows(fmaps, (64, 80), scales, boxes, backbone.spec, pyramid)
    assert pooled.shape == (len(boxes), 256 * 50) and pooled.dtype == torch.float32
    assert torch.isfinite(pooled).all()
    chosen = spp.choose_scale(boxes, (64, 80), scales)
    for i in range(len(boxes) - 1):  # the tiny windows: every bin of every level is one and the same cell
        fmap = fmaps[chosen[i]]
        x0, y0, x1, y1 = spp.boxes_to_cells(spp.scale_boxes(boxes[i:i + 1], (64, 80), scales[chosen[i]]),
                                            fmap.shape[-2:], backbone.spec)[0]
        assert (x0, y0) == (x1, y1) and 0 <= x0 < fmap.shape[2] and 0 <= y0 < fmap.shape[1]
        cell = fmap[:, y0, x0]  # levels in pyramid order, each (C, y, x): every channel's value n*n times
        assert torch.equal(pooled[i], torch.cat([cell.repeat_interleave(n * n) for n in pyramid]))
    # The fc head takes them like any window.
    head = nets.SppHead(256, pyramid, fc_dim=32, num_classes=3).eval()
    with torch.no_grad():
        assert torch.isfinite(head.features(pooled, "fc7")).all()


# -- zero windows: an image without proposals through every later stage ------------------------------------------------
def test_images_without_proposals_flow_through_finetune_svm_bbox_and_detect(tmp_path):
    rng = np.random.default_rng(0)
    images, boxes_voc = {}, {}
    for k in range(4):
        img = (rng.random((72, 96, 3)) * 60).astype(np.uint8)
        x0, y0 = 4 + 3 * k, 6 + 2 * k
        img[y0:y0 + 30, x0:x0 + 36] = (210, 40, 40)
        img[40:66, 50:90] = (40, 200, 60)
        objects = [("red", (x0 + 1, y0 + 1, x0 + 36, y0 + 30), False), ("green", (51, 41, 90, 66), False)]
        images[f"im{k}"] = (img, objects)
        boxes_voc[f"im{k}"] = jittered_and_random_proposals(rng, objects)
    # Training: an image with no objects and no proposals has no window at all. Test: objects, no proposals.
    images["empty"], boxes_voc["empty"] = ((rng.random((72, 96, 3)) * 60).astype(np.uint8), []), np.zeros((0, 4))
    images["bare"], boxes_voc["bare"] = images["im1"], np.zeros((0, 4))
    images["t0"], boxes_voc["t0"] = images["im0"], boxes_voc["im0"]
    devkit = write_devkit(tmp_path / "devkit", images, {"trainval": ["im0", "im1", "empty", "im2", "im3"],
                                                        "test": ["t0", "bare"]}, classes=("red", "green"))
    np.savez(tmp_path / "boxes.npz", **boxes_voc)
    cfg = build_config(None, {
        "runs_root": str(tmp_path / "runs"), "data.dataset": "voc2007", "data.voc_root": str(devkit), "device": "cpu",
        "proposals.min_side": 8, "features.scales": [64, 96], "features.one_scale": 96, "model.fc_dim": 32,
        "svm.workers": 1, "finetune.iters": 6, "finetune.eval_every": 3, "finetune.batch_size": 16,
        "finetune.holdout_batches": 1, "finetune.lr_steps": [4], "finetune.holdout_fraction": 0.25})
    run = Run(cfg.run_dir)
    for split in ("trainval", "test"):
        with pytest.warns(UserWarning, match="no proposals"):
            proposals.run(cfg, split, boxes_file=tmp_path / "boxes.npz")
    fake_checkpoint(run, "pretrain", num_classes=10)
    for split in ("trainval", "test"):
        extract_features.run(cfg, split)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = finetune.run(cfg)
        assert tuned.manifest.metrics["train_images"] + tuned.manifest.metrics["holdout_images"] == 5
        assert tuned.manifest.metrics["best_holdout_error"] is not None  # held-out images are ones with windows
        svms = train_svm.run(cfg, feature="ftfc7")
        assert load_svm_model(svms.manifest.output("svm")).trained.all()
        boxes = train_bbox.run(cfg)
        assert (load_bbox_model(boxes.manifest.output("bbox")).samples > 0).all()
        found = detect.run(cfg, "test", feature="ftfc7")
    with np.load(found.manifest.output("detections")) as dets:
        assert list(dets["image_ids"]) == ["t0", "bare"]
        assert len(dets["image_index"]) and (dets["image_index"] == 0).all()  # none on the image without windows
    assert found.manifest.metrics["images"] == 2
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # e.g. no mean of an empty array


# -- the CLI writes nothing outside its run directory; missing and stale inputs ----------------------------------------
def test_cli_pipeline_writes_only_inside_its_run_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = {}
    for k in range(4):
        img = (rng.random((64, 80, 3)) * 60).astype(np.uint8)
        img[10:40, 12 + k:50 + k] = (200, 30, 30)
        img[45:60, 55:75] = (30, 200, 30)
        images[f"img{k}"] = (img, [("red", (13 + k, 11, 50 + k, 40), False), ("green", (56, 46, 75, 60), False)])
    data = tmp_path / "data"
    devkit = write_devkit(data / "devkit", images, {"trainval": ["img0", "img1", "img2"], "test": ["img3"]},
                          classes=("red", "green"))
    tree = make_tree(data / "classification", classes=("red", "green"), train=4, val=2)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's own file\n")
    monkeypatch.chdir(work)  # the default runs root, data/runs, is relative to it
    before_data, before_work = snapshot(data), snapshot(work)

    runner = CliRunner()
    common = ["--run", "t", "--dataset", "voc2007", "--voc-root", str(devkit), "--device", "cpu"]
    sets = ["model.fc_dim=32", "features.scales=[64, 96]", "features.one_scale=96", "pretrain.sizes=[48]",
            "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.workers=0", "pretrain.lr_steps=[]",
            "proposals.workers=1", "proposals.min_side=8", "finetune.iters=4", "finetune.eval_every=2",
            "finetune.batch_size=16", "finetune.holdout_batches=1", "finetune.lr_steps=[3]", "svm.workers=1"]

    def spp(*args: str):
        result = runner.invoke(cli, list(args))
        assert result.exit_code == 0, result.output
        return result

    spp("pretrain", *common, *[a for s in sets for a in ("--set", s)], "--data", str(tree))
    for split in ("trainval", "test"):
        spp("proposals", *common, "--split", split)
        spp("extract-features", *common, "--split", split)
    spp("finetune", *common)
    spp("train-svm", *common, "--feature", "ftfc7")
    spp("train-bbox", *common)
    spp("detect", *common, "--feature", "ftfc7")
    assert "mAP" in spp("eval", *common, "--feature", "ftfc7").output

    # Missing and stale inputs: one line naming the command to run (and still no write outside the run).
    line = one_line_error(runner.invoke(cli, ["finetune", "--run", "fresh", *common[2:]]))
    assert "missing input: stage 'pretrain'" in line and "run `spp pretrain --run fresh` first" in line
    spp("proposals", *common, "--split", "trainval", "--set", "proposals.min_side=12")  # upstream changes
    line = one_line_error(runner.invoke(cli, ["train-svm", *common, "--feature", "ftfc7"]))
    assert "stale input: stage 'finetune' was built from an older proposals; rerun `spp finetune --run t`" in line

    assert snapshot(data) == before_data  # the dataset (and the classification set) untouched
    after_work = snapshot(work)
    allowed = ("data", "data/runs", "data/runs/t")
    changed = sorted(key for key in set(after_work) | set(before_work) if after_work.get(key) != before_work.get(key)
                     and key not in allowed and not key.startswith("data/runs/t/"))
    assert changed == []
    assert sorted(os.listdir(work / "data" / "runs")) == ["t"]  # the failed command on "fresh" wrote nothing
