"""Your own dataset (``--dataset voc``): a VOC-layout folder with your classes (``classes.txt`` or the
annotations), any common image extension, through the whole pipeline; and voc2007 / synth unchanged.

The end-to-end test builds a tiny two-class folder (``cat_toy``, ``mug``; PNG and upper-case ``.JPG`` images) and
runs every stage through the CLI with the cut-down sizes of test_pipeline.py; the assertions check that the
run's models, detections and metrics name exactly those classes, not that the tiny detector is good.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sppcli.cli import cli
from stages import synth
from stages.core.artifacts import Run, read_manifest
from stages.core.config import build_config
from stages.core.errors import InputError, SppError
from stages.core.voc import VOC_CLASSES, VocDataset, read_classes_file, resolve_voc_root

from conftest import write_devkit

CLASSES = ("cat_toy", "mug")


def _object_xml(name: str, box: tuple[int, int, int, int], difficult: bool = False) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def write_annotation(root: Path, image_id: str, width: int, height: int, objects, filename: str | None = None):
    """A VOC XML as annotation tools write it (``objects``: [(class, (xmin, ymin, xmax, ymax) 1-based)])."""
    name = f"<filename>{filename}</filename>" if filename else ""
    body = "".join(_object_xml(c, b) for c, b in objects)
    (root / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><folder>mine</folder>{name}<size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{body}</annotation>")


def make_own_dataset(root: Path, n_train: int = 6, n_test: int = 3, classes_txt: bool = True,
                     size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """A VOC-layout folder: images alternate ``.png`` / ``.JPG``; each holds a red ``cat_toy`` block and a blue
    ``mug`` disc on a noisy grey background; splits ``trainval`` and ``test``; ``classes.txt`` (with a comment and a
    blank line) unless ``classes_txt`` is false."""
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    height, width = size
    ids = [f"photo_{k:02d}" for k in range(n_train + n_test)]
    yy, xx = np.mgrid[:height, :width]
    for k, image_id in enumerate(ids):
        pixels = (90 + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
        w1, h1 = rng.integers(28, 44), rng.integers(24, 40)
        x1, y1 = rng.integers(2, width // 2 - w1 // 2), rng.integers(2, height - h1 - 2)
        pixels[y1:y1 + h1, x1:x1 + w1] = (210, 40, 40)
        r = int(rng.integers(12, 18))
        cx, cy = int(rng.integers(width // 2 + r, width - r - 2)), int(rng.integers(r + 2, height - r - 2))
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (40, 60, 220)
        ext = ".png" if k % 2 == 0 else ".JPG"
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}{ext}",
                                     format="PNG" if ext == ".png" else "JPEG", quality=95)
        objects = [("cat_toy", (x1 + 1, y1 + 1, x1 + w1, y1 + h1)), ("mug", (cx - r + 1, cy - r + 1, cx + r, cy + r))]
        write_annotation(root, image_id, width, height, objects, filename=f"{image_id}{ext}" if k % 3 else None)
    (root / "ImageSets/Main/trainval.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (root / "ImageSets/Main/test.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))
    if classes_txt:
        (root / "classes.txt").write_text("# my toys\ncat_toy\n\nmug  # coffee mugs\n")
    return root


@pytest.fixture
def own(tmp_path: Path) -> Path:
    return make_own_dataset(tmp_path / "mine", n_train=3, n_test=2)


def _data_cfg(voc_root: Path, **overrides):
    return build_config(None, {"data.dataset": "voc", "data.voc_root": str(voc_root),
                               **{f"data.{k}": v for k, v in overrides.items()}}).data


# -- classes ----------------------------------------------------------------------------------------------------
def test_classes_come_from_classes_txt_in_its_order(own):
    (own / "classes.txt").write_text("mug\n# the other one\ncat_toy\n\n")
    dataset = VocDataset.from_config(_data_cfg(own))
    assert dataset.classes == ("mug", "cat_toy") and dataset.classes_source == "classes.txt"
    ann = dataset.annotation("photo_00")
    assert [dataset.classes[k] for k in ann.labels] == ["cat_toy", "mug"]


def test_without_classes_txt_the_classes_are_the_sorted_names_of_the_training_annotations(own, caplog):
    (own / "classes.txt").unlink()
    write_annotation(own, "photo_00", 128, 96, [("zebra_mug", (1, 1, 10, 10)), ("cat_toy", (5, 5, 20, 20))])
    write_annotation(own, "photo_03", 128, 96, [("only_in_test", (1, 1, 10, 10))])  # a test image: not read
    with caplog.at_level(logging.INFO, logger="stages.core.voc"):
        dataset = VocDataset.from_config(_data_cfg(own))
        assert dataset.classes == ("cat_toy", "mug", "zebra_mug") and dataset.classes_source == "annotations"
    assert "no classes.txt" in caplog.text and "'trainval' annotations: cat_toy, mug, zebra_mug" in caplog.text
    # a class of the test split the training annotations never name: one line saying where the list came from
    with pytest.raises(InputError, match=r"photo_03\.xml: unknown class 'only_in_test' \(not among the 3 classes "
                                         r"named in the 'trainval' annotations"):
        dataset.annotations("test")
    # data.train_split names the split the classes are read from
    assert VocDataset.from_config(_data_cfg(own, train_split="test")).classes == ("cat_toy", "mug", "only_in_test")


def test_a_class_missing_from_classes_txt_is_one_line_naming_the_xml_and_the_class(own):
    write_annotation(own, "photo_01", 128, 96, [("teapot", (1, 1, 10, 10))])
    dataset = VocDataset.from_config(_data_cfg(own))
    with pytest.raises(InputError) as err:
        dataset.annotations("trainval")
    message = str(err.value)
    assert message.startswith(f"{own / 'Annotations' / 'photo_01.xml'}: unknown class 'teapot' (not in ")
    assert "classes.txt" in message and "\n" not in message
    # data.skip_bad: the image is left out with a warning instead
    skipping = VocDataset.from_config(_data_cfg(own, skip_bad=True))
    with pytest.warns(UserWarning, match="skipping: .*photo_01.xml: unknown class 'teapot'"):
        assert [a.image_id for a in skipping.annotations("trainval")] == ["photo_00", "photo_02"]


@pytest.mark.parametrize("name", ["a/b", "../up", "traffic light", "mug*", ".hidden", "__background__"])
def test_unsafe_class_names_are_refused_with_one_line(own, name):
    (own / "classes.txt").write_text(f"cat_toy\n{name}\n")
    with pytest.raises(InputError, match=r"classes\.txt: line 2: class name .* (not safe for file names|reserved)"):
        VocDataset.from_config(_data_cfg(own))
    (own / "classes.txt").unlink()  # read from the annotations: the error names the xml
    write_annotation(own, "photo_01", 128, 96, [(name, (1, 1, 10, 10))])
    with pytest.raises(InputError, match=r"photo_01\.xml: class name .* (not safe for file names|reserved)"):
        VocDataset.from_config(_data_cfg(own)).classes


def test_classes_txt_mistakes_are_one_line_with_the_line_number(tmp_path):
    path = tmp_path / "classes.txt"
    for text, problem in [("mug\ncat_toy\nmug\n", r"line 3: class 'mug' is listed twice \(line 1\)"),
                          ("Mug\nmug\n", r"line 2: class 'mug' and 'Mug' differ only in case"),
                          ("# nothing\n\n", "lists no classes")]:
        path.write_text(text)
        with pytest.raises(InputError, match=problem):
            read_classes_file(path)
    path.write_text("\ufeffcafé_cup\nmug\n")  # a BOM (Windows editors) and non-ASCII letters are fine
    assert read_classes_file(path) == ("café_cup", "mug")


# -- images -----------------------------------------------------------------------------------------------------
def test_any_common_image_extension_in_any_case_is_found_by_id(own):
    jpegs = own / "JPEGImages"
    pixels = np.asarray(Image.open(jpegs / "photo_00.png").convert("RGB"))
    dataset = VocDataset.from_config(_data_cfg(own))
    assert dataset.image_path("photo_00").name == "photo_00.png"
    assert dataset.image_path("photo_01").name == "photo_01.JPG"
    for ext, fmt in [(".jpeg", "JPEG"), (".bmp", "BMP"), (".TIFF", "TIFF"), (".webp", "WEBP"), (".Tif", "TIFF")]:
        for old in jpegs.glob("photo_00.*"):
            old.unlink()
        Image.fromarray(pixels).save(jpegs / f"photo_00{ext}", format=fmt, **({"lossless": True} if fmt == "WEBP"
                                                                               else {}))
        fresh = VocDataset.from_config(_data_cfg(own))
        assert fresh.image_path("photo_00").name == f"photo_00{ext}"
        assert fresh.load_image("photo_00").shape == (96, 128, 3)
    (jpegs / "photo_02.txt").write_text("not an image")  # other files beside an image are ignored
    assert VocDataset.from_config(_data_cfg(own)).image_path("photo_02").suffix == ".png"


def test_a_missing_or_doubled_image_is_one_line_naming_the_id(own):
    jpegs = own / "JPEGImages"
    (jpegs / "photo_00.png").unlink()
    with pytest.raises(InputError, match=rf"^{re.escape(str(jpegs))}: no image for id 'photo_00': looked for "
                                         r"photo_00\.<ext> with ext one of jpg, jpeg, png"):
        VocDataset.from_config(_data_cfg(own)).load_image("photo_00")
    (jpegs / "photo_03.png").write_bytes((jpegs / "photo_03.JPG").read_bytes())  # its xml has no <filename>
    with pytest.raises(InputError, match=r"2 images for id 'photo_03' \(photo_03\.JPG, photo_03\.png\): keep one"):
        VocDataset.from_config(_data_cfg(own)).image_path("photo_03")
    # the annotation's <filename> settles it
    write_annotation(own, "photo_03", 128, 96, [("mug", (1, 1, 10, 10))], filename="photo_03.png")
    assert VocDataset.from_config(_data_cfg(own)).image_path("photo_03").name == "photo_03.png"


def test_the_annotations_filename_names_an_image_with_another_stem(own):
    jpegs = own / "JPEGImages"
    (jpegs / "photo_02.png").rename(jpegs / "IMG_0042.png")
    write_annotation(own, "photo_02", 128, 96, [("mug", (1, 1, 10, 10))], filename="IMG_0042.png")
    dataset = VocDataset.from_config(_data_cfg(own))
    assert dataset.image_path("photo_02") == jpegs / "IMG_0042.png"
    assert dataset.load_image("photo_02").shape == (96, 128, 3)
    write_annotation(own, "photo_02", 128, 96, [("mug", (1, 1, 10, 10))], filename="../../etc/passwd")
    with pytest.raises(InputError, match="no image for id 'photo_02'"):  # never a path outside JPEGImages/
        VocDataset.from_config(_data_cfg(own)).image_path("photo_02")


def test_the_fingerprint_follows_classes_txt_and_image_renames_but_not_comments(own):
    dataset = VocDataset.from_config(_data_cfg(own))
    before = dataset.fingerprint("test")
    (own / "classes.txt").write_text("cat_toy  # edited comment\nmug\n")
    assert VocDataset.from_config(_data_cfg(own)).fingerprint("test") == before
    (own / "classes.txt").write_text("mug\ncat_toy\n")
    assert VocDataset.from_config(_data_cfg(own)).fingerprint("test") != before
    (own / "classes.txt").write_text("cat_toy\nmug\n")
    jpegs = own / "JPEGImages"
    Image.open(jpegs / "photo_03.JPG").save(jpegs / "photo_03.png")
    (jpegs / "photo_03.JPG").unlink()
    assert VocDataset.from_config(_data_cfg(own)).fingerprint("test") != before


# -- where the dataset is ---------------------------------------------------------------------------------------
def test_voc_root_may_be_the_layout_folder_or_a_folder_holding_exactly_one(tmp_path):
    layout = make_own_dataset(tmp_path / "devkit" / "MyToys2024", n_train=2, n_test=1)
    (tmp_path / "devkit" / "notes").mkdir()  # other folders beside it are fine
    assert resolve_voc_root("voc", tmp_path / "devkit") == layout
    assert resolve_voc_root("voc", layout) == layout
    dataset = VocDataset.from_config(_data_cfg(tmp_path / "devkit"))
    assert dataset.root == layout and dataset.classes == CLASSES
    assert VocDataset(dataset.devkit_root).image_path("photo_01") == dataset.image_path("photo_01")  # as workers do

    make_own_dataset(tmp_path / "devkit" / "Other", n_train=2, n_test=1)
    with pytest.raises(SppError, match=r"holds 2 VOC-layout folders \(MyToys2024/, Other/\); pass the one"):
        resolve_voc_root("voc", tmp_path / "devkit")
    with pytest.raises(SppError, match="not a VOC-layout dataset: expected Annotations/, JPEGImages/ and "
                                       "ImageSets/Main/ here or in exactly one subfolder"):
        resolve_voc_root("voc", tmp_path / "devkit" / "notes")
    with pytest.raises(SppError, match="needs --voc-root"):
        resolve_voc_root("voc", "")
    (layout / "JPEGImages").rename(layout / "images")
    with pytest.raises(SppError, match="VOC-layout folder without JPEGImages/"):
        resolve_voc_root("voc", layout)


def test_a_proposals_worker_reads_images_without_needing_the_class_list(own):
    """Workers rebuild the dataset from ``devkit_root`` alone, without data.train_split: loading an image there
    must not read the class names from a split list that may not exist (here: no classes.txt, no trainval)."""
    (own / "classes.txt").unlink()
    split_dir = own / "ImageSets" / "Main"
    (split_dir / "trainval.txt").rename(split_dir / "mytrain.txt")
    main = VocDataset.from_config(_data_cfg(own, train_split="mytrain"))
    assert main.classes == CLASSES
    worker = VocDataset(str(main.devkit_root))
    assert worker.own and worker.load_image("photo_01").shape == (96, 128, 3)
    with pytest.raises(InputError, match="no split list 'trainval' .data.train_split. whose annotations"):
        worker.classes


def test_a_devkit_voc2007_folder_reads_as_voc_too(tiny_devkit):
    """A VOCdevkit holding VOC2007/ is a folder holding exactly one VOC-layout folder: --dataset voc reads it with
    its classes.txt (here ``red``, ``green``), the same annotations and images."""
    mine, theirs = VocDataset.from_config(_data_cfg(tiny_devkit)), VocDataset(tiny_devkit)
    assert mine.root == theirs.root and mine.classes == theirs.classes == ("red", "green")
    assert mine.image_path("img0") == theirs.image_path("img0")
    np.testing.assert_array_equal(mine.annotation("img2").boxes, theirs.annotation("img2").boxes)


# -- voc2007 and synth are what they were -----------------------------------------------------------------------
def test_voc2007_and_synth_class_lists_and_fingerprints_are_unchanged(tmp_path, tiny_devkit):
    assert VOC_CLASSES == (
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
        "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
    rng = np.random.default_rng(0)
    plain = write_devkit(tmp_path / "voc", {"a": ((rng.random((20, 30, 3)) * 255).astype(np.uint8),
                                                  [("dog", (2, 2, 10, 10), False)])}, {"test": ["a"]})
    dataset = VocDataset.from_config(build_config(None, {"data.dataset": "voc2007",
                                                         "data.voc_root": str(plain)}).data)
    assert dataset.classes == VOC_CLASSES and dataset.kind == "voc2007" and not dataset.own
    assert dataset.image_path("a") == plain / "VOC2007" / "JPEGImages" / "a.jpg"
    # the fingerprint as it was computed before own datasets existed
    import hashlib
    voc = plain / "VOC2007"
    digest = hashlib.sha256((voc / "ImageSets/Main/test.txt").read_bytes())
    digest.update("\n".join(VOC_CLASSES).encode())
    digest.update((voc / "Annotations/a.xml").read_bytes())
    assert dataset.fingerprint("test") == digest.hexdigest()
    # voc2007 still names every image <id>.jpg (the PASCAL layout), pointing at --dataset voc for others
    (voc / "JPEGImages" / "a.jpg").rename(voc / "JPEGImages" / "a.png")
    with pytest.raises(InputError, match=r"missing image \(there is a\.png.*--dataset voc reads any image format"):
        dataset.load_image("a")

    devkit = tmp_path / "synth"
    synth.generate(devkit, seed=0, images=6, crops_per_class=1)
    synth_set = VocDataset.from_config(build_config(None, {"data.dataset": "synth",
                                                           "data.voc_root": str(devkit)}).data)
    assert synth_set.classes == synth.CLASSES and synth_set.classes_source == "classes.txt"
    assert synth_set.kind == "synth" and not synth_set.own


def test_the_dataset_choice_is_checked(tmp_path):
    with pytest.raises(SppError, match="config data.dataset: 'coco' is not one of synth, voc2007, voc"):
        build_config(None, {"data.dataset": "coco"})
    result = CliRunner().invoke(cli, ["proposals", "--split", "test", "--runs-root", str(tmp_path),
                                      "--dataset", "voc"])
    assert result.exit_code == 1 and "--dataset voc needs --voc-root DIR" in result.output
    result = CliRunner().invoke(cli, ["proposals", "--split", "test", "--runs-root", str(tmp_path),
                                      "--dataset", "voc2007", "--voc-root",
                                      str(make_own_dataset(tmp_path / "mine", 1, 1))])
    assert result.exit_code == 1 and "use --dataset voc" in result.output


# -- end to end -------------------------------------------------------------------------------------------------
TINY = ["model.width=0.25", "model.fc_dim=64", "features.scales=[96, 128]", "features.one_scale=128",
        "features.flip=false", "pretrain.sizes=[48, 64]", "pretrain.epochs=1", "pretrain.batch_size=8",
        "pretrain.workers=0", "proposals.max_boxes=60", "proposals.workers=1", "finetune.iters=6",
        "finetune.lr_steps=[4]", "finetune.eval_every=3", "finetune.batch_size=16", "finetune.holdout_batches=1",
        "finetune.flip=false", "detect.score_thresh=-10"]


def _spp(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_own_dataset_end_to_end(tmp_path: Path):
    root = make_own_dataset(tmp_path / "devkit" / "MyToys", n_train=6, n_test=3)
    runner = CliRunner()
    common = ["--run", "mine", "--runs-root", str(tmp_path / "runs"), "--dataset", "voc", "--voc-root",
              str(tmp_path / "devkit"), "--device", "cpu"]
    crops = tmp_path / "crops"
    out = _spp(runner, "data", "crops", "--dataset", "voc", "--voc-root", str(root), "--split", "trainval",
               "--out", str(crops), "--val-fraction", "0.34", "--short-side", "48")
    assert sorted(p.name for p in (crops / "train").iterdir()) == list(CLASSES), out
    sets = [arg for item in TINY for arg in ("--set", item)]
    out = _spp(runner, "pretrain", *common, "--data", str(crops), *sets)
    assert "2 classes" in out
    for split in ("trainval", "test"):
        assert "recall" in _spp(runner, "proposals", *common, "--split", split).lower()
        _spp(runner, "extract-features", *common, "--split", split)
    _spp(runner, "finetune", *common)
    _spp(runner, "train-svm", *common, "--feature", "ftfc7")
    _spp(runner, "train-bbox", *common)
    _spp(runner, "detect", *common, "--feature", "ftfc7", "--bbox")
    table = _spp(runner, "eval", *common, "--feature", "ftfc7", "--bbox")
    assert re.search(r"^cat_toy\s", table, re.M) and re.search(r"^mug\s", table, re.M) and "mAP" in table

    run = Run(tmp_path / "runs" / "mine")
    config = json.loads((run.root / "config.json").read_text())["data"]
    assert config["dataset"] == "voc" and config["voc_root"] == str(tmp_path / "devkit")
    metrics = json.loads((run.stage_dir("eval", "test-ftfc7-s2-bb") / "metrics.json").read_text())
    assert list(metrics["ap"]) == list(CLASSES) and metrics["num_images"] == 3
    assert metrics["npos"] == {"cat_toy": 3, "mug": 3}
    assert all(0.0 <= ap <= 1.0 for ap in metrics["ap"].values())
    # the run records the class list: the fine-tuned net, the SVMs, the detections
    import torch
    meta = torch.load(run.stage_dir("finetune") / "model.pt", weights_only=True)["meta"]
    assert meta["class_names"] == ["__background__", *CLASSES]
    assert list(read_manifest(run.manifest_path("svm", "ftfc7-s2")).metrics["classes"]) == list(CLASSES)
    comp4 = read_manifest(run.manifest_path("detect", "test-ftfc7-s2-bb")).output("comp4_dir")
    assert sorted(p.name for p in comp4.iterdir()) == [f"comp4_det_test_{c}.txt" for c in CLASSES]

    # editing classes.txt (another order) makes the dataset's stages stale instead of silently mixing labels
    (root / "classes.txt").write_text("mug\ncat_toy\n")
    result = runner.invoke(cli, ["finetune", *common])
    assert result.exit_code == 0 and "up to date" not in result.output, result.output
