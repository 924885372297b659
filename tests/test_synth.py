"""The embedded synthetic dataset: determinism, VOC layout, tight boxes, classification tree, colour-blind classes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from stages import synth
from stages.core.errors import SppError
from stages.core.voc import VocDataset

IMAGES = 24  # ~10 train / 5 val / 9 test: enough for every class in train and test (round-robin primary class)
CROPS = 3


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    synth.generate(out, seed=7, images=IMAGES, crops_per_class=CROPS)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(generated, tmp_path):
    again = tmp_path / "b"
    other = tmp_path / "c"
    synth.generate(again, seed=7, images=IMAGES, crops_per_class=CROPS)
    synth.generate(other, seed=8, images=IMAGES, crops_per_class=CROPS)
    first = _hashes(generated)
    assert len(first) == IMAGES * 2 + 4 + 1 + 1 + len(synth.CLASSES) * (CROPS + 1)  # jpg+xml, splits, classes, json
    assert _hashes(again) == first
    different = _hashes(other)
    assert different.keys() == first.keys()
    assert all(different[k] != first[k] for k in first if k.endswith(".jpg"))


def test_layout_is_a_readable_voc_devkit(generated):
    ds = VocDataset(generated)
    assert ds.classes == synth.CLASSES
    splits = {s: ds.image_ids(s) for s in ("train", "val", "trainval", "test")}
    assert sorted(splits["trainval"]) == sorted(splits["train"] + splits["val"])
    everything = splits["train"] + splits["val"] + splits["test"]
    assert sorted(everything) == [f"{i:06d}" for i in range(1, IMAGES + 1)]  # disjoint and complete
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (10, 5, 9)  # 40/20/40 %
    for split in ("train", "test"):
        labels = np.concatenate([a.labels for a in ds.annotations(split)])
        assert set(labels.tolist()) == set(range(len(synth.CLASSES))), f"a class is missing from {split}"
    for image_id in everything:
        ann = ds.annotation(image_id)
        image = ds.load_image(image_id)  # raises if the pixels do not match the annotated size
        assert 1 <= len(ann) <= 5
        assert 220 <= min(image.shape[:2]) <= 300
        assert 0.74 <= ann.width / ann.height <= 1.34
    info = json.loads((generated / "SYNTH.json").read_text())
    assert (info["seed"], info["images"], info["classes"]) == (7, IMAGES, list(synth.CLASSES))
    assert info["version"] == synth.GENERATOR_VERSION
    assert not list(generated.glob(".synth-staging-*"))


def test_boxes_are_the_tight_extent_of_the_drawn_shape(generated):
    ds = VocDataset(generated)
    checked = 0
    for image_id in ds.image_ids("test")[:6]:
        scene = synth.render_image(7, IMAGES, image_id)
        ann = ds.annotation(image_id)
        assert scene.image.shape[:2] == (ann.height, ann.width)
        assert np.array_equal(ann.boxes, np.array([o.box for o in scene.objects]))
        assert np.array_equal(ann.labels, [o.label for o in scene.objects])
        assert np.array_equal(ann.difficult, [o.difficult for o in scene.objects])
        for obj, box in zip(scene.objects, ann.boxes.astype(int)):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= ann.width and 0 <= y1 < y2 <= ann.height
            inside = np.zeros_like(obj.mask)
            inside[y1:y2, x1:x2] = True
            assert not (obj.mask & ~inside).any(), "mask pixels outside the box"
            assert obj.mask[y1:y2, x1].any() and obj.mask[y1:y2, x2 - 1].any(), "box not tight in x"
            assert obj.mask[y1, x1:x2].any() and obj.mask[y2 - 1, x1:x2].any(), "box not tight in y"
            checked += 1
    assert checked >= 6


def test_tight_box_golden_value():
    mask = np.zeros((10, 12), dtype=bool)
    mask[3:7, 2] = True
    mask[5, 2:9] = True
    assert synth.tight_box(mask).tolist() == [2.0, 3.0, 9.0, 7.0]


def test_drawn_objects_are_visible_in_the_pixels():
    """A shape's pixels differ from its surroundings: every non-difficult object has contrast at its border."""
    plans = synth.plan_images(3, 12)
    for plan in plans[:4]:
        scene = synth.render_scene(3, plan)
        image = scene.image.astype(np.float32)
        for obj in scene.objects:
            if obj.difficult:
                continue
            x1, y1, x2, y2 = obj.box.astype(int)
            ring = np.zeros_like(obj.mask)
            ring[max(y1 - 4, 0):y2 + 4, max(x1 - 4, 0):x2 + 4] = True
            ring &= ~obj.mask
            if ring.sum() < 20:
                continue  # fills the image
            assert np.abs(image[obj.mask].mean(0) - image[ring].mean(0)).max() > 5


def test_difficult_fraction_is_about_ten_percent():
    objects = difficult = 0
    for plan in synth.plan_images(0, 80):
        scene = synth.render_scene(0, plan)
        objects += len(scene.objects)
        difficult += sum(o.difficult for o in scene.objects)
    assert objects >= 150
    assert 0.04 <= difficult / objects <= 0.2


def test_colour_does_not_identify_the_class():
    """A classifier on each object's mean visible colour stays near chance (1/6); shape is what separates them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    features, labels = [], []
    for plan in synth.plan_images(1, 40):
        scene = synth.render_scene(1, plan)
        for obj in scene.objects:
            features.append(scene.image[obj.mask].mean(axis=0) / 255)
            labels.append(obj.label)
    accuracy = cross_val_score(LogisticRegression(max_iter=500), np.array(features), np.array(labels), cv=4).mean()
    assert accuracy < 0.3


def test_classification_tree_reads_as_imagefolder(generated):
    from torchvision.datasets import ImageFolder

    for split, per_class in (("train", CROPS), ("val", 1)):
        folder = ImageFolder(str(generated / "classification" / split))
        assert folder.classes == sorted(synth.CLASSES)
        assert len(folder) == per_class * len(synth.CLASSES)
        image, label = folder[0]
        assert min(image.size) >= 20 and folder.classes[label] in synth.CLASSES


def test_plan_balances_classes_per_split():
    plans = synth.plan_images(0, 240)
    assert [p.image_id for p in plans][:2] == ["000001", "000002"]
    for split, n in (("train", 96), ("val", 48), ("test", 96)):
        primaries = [p.primary_label for p in plans if p.split == split]
        assert len(primaries) == n
        assert np.bincount(primaries, minlength=6).min() == n // 6
    with pytest.raises(SppError):
        synth.plan_images(0, 2)


def test_regenerating_replaces_the_dataset_but_never_a_foreign_one(tmp_path):
    out = tmp_path / "ds"
    synth.generate(out, seed=1, images=6, crops_per_class=1)
    synth.generate(out, seed=2, images=5, crops_per_class=1)
    assert json.loads((out / "SYNTH.json").read_text())["seed"] == 2
    assert len(list((out / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 5
    assert not list(out.glob(".synth-staging-*"))
    foreign = tmp_path / "real"
    (foreign / "VOC2007").mkdir(parents=True)
    with pytest.raises(SppError, match="did not write"):
        synth.generate(foreign, seed=0, images=6, crops_per_class=1)
    assert not any((foreign / "VOC2007").iterdir())


def test_cli_writes_the_dataset(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sppcli.cli import cli

    monkeypatch.setattr(synth, "CROPS_TRAIN_PER_CLASS", 2)  # the CLI's default crop count, made quick

    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "cli"), "--seed", "3",
                                      "--num-images", "4"])
    assert result.exit_code == 0, result.output
    assert "4 detection images" in result.output
    assert VocDataset(tmp_path / "cli").image_ids("test")
    assert synth.synth_info(tmp_path / "cli")["classification_per_class"] == {"train": 2, "val": 1}
    more = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "more"), "--num-images", "3",
                                    "--crops-per-class", "4"])
    assert more.exit_code == 0 and synth.synth_info(tmp_path / "more")["classification_per_class"] == {"train": 4,
                                                                                                      "val": 1}
    bad = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "bad"), "--num-images", "1"])
    assert bad.exit_code == 1 and "at least 3" in bad.output
