"""``spp data crops``: ImageFolder layout, train/val division by image, difficult objects left out, context
box by hand, determinism, skip when up to date, refusal to overwrite a foreign tree."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import cli
from stages import crops
from stages.core.errors import SppError

from conftest import write_devkit

IDS = [f"im{k}" for k in range(6)]


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    """Six 60x90 images, each with a red (non-difficult), a green (difficult in im5) and a thin blue object."""
    rng = np.random.default_rng(0)
    images = {}
    for k, image_id in enumerate(IDS):
        img = (rng.random((60, 90, 3)) * 60).astype(np.uint8)
        images[image_id] = (img, [("red", (1, 1, 30, 20), False), ("green", (41, 11, 80, 50), k == 5),
                                  ("blue", (5, 30, 8, 59), False)])
    return write_devkit(tmp_path / "devkit", images, {"all": IDS}, classes=("red", "green", "blue"))


def _files(out: Path) -> dict[str, list[str]]:
    return {half: sorted(str(p.relative_to(out / half)) for p in (out / half).rglob("*.jpg"))
            for half in ("train", "val")}


def test_crop_box_by_hand():
    # 20 x 40 box grown by 10% of each side: 2 px left/right, 4 px top/bottom.
    assert crops.crop_box(np.array([10.0, 20.0, 30.0, 60.0]), 100, 100, 0.1) == (8, 16, 32, 64)
    # at the image border the growth is clipped; a degenerate box still gives one pixel
    assert crops.crop_box(np.array([0.0, 0.0, 50.0, 10.0]), 50, 10, 0.1) == (0, 0, 50, 10)
    assert crops.crop_box(np.array([5.0, 5.0, 5.0, 5.0]), 10, 10, 0.0) == (5, 5, 6, 6)


def test_tree_divided_by_image_without_difficult_and_resized(devkit, tmp_path):
    out = tmp_path / "crops"
    summary = crops.write_crops(out, dataset="voc2007", voc_root=devkit, split="all", val_fraction=0.34, seed=3,
                                short_side=32)
    assert summary.startswith("wrote ")
    files = _files(out)
    image_of = {half: {Path(f).name.rsplit("_", 1)[0] for f in names} for half, names in files.items()}
    assert image_of["train"].isdisjoint(image_of["val"])
    assert image_of["train"] | image_of["val"] == set(IDS)
    assert len(image_of["val"]) == 2  # round(0.34 * 6)
    everything = files["train"] + files["val"]
    assert len(everything) == 6 * 3 - 1  # im5's green object is difficult
    assert "green/im5_1.jpg" not in everything
    for path in (out / "train").rglob("*.jpg"):
        image = cv2.imread(str(path))
        assert min(image.shape[:2]) == 32
        assert max(image.shape[:2]) <= crops.MAX_ASPECT * 32  # the thin blue box (4 x 30 + context) is capped
    # same inputs, same seed: the same files; the run is skipped when up to date
    again = tmp_path / "again"
    crops.write_crops(again, dataset="voc2007", voc_root=devkit, split="all", val_fraction=0.34, seed=3,
                      short_side=32)
    assert _files(again) == files
    assert crops.write_crops(out, dataset="voc2007", voc_root=devkit, split="all", val_fraction=0.34, seed=3,
                             short_side=32).startswith("up to date")


def test_cli_and_refusals(devkit, tmp_path):
    runner = CliRunner()
    out = tmp_path / "tree"
    result = runner.invoke(cli, ["data", "crops", "--voc-root", str(devkit), "--split", "all", "--out", str(out),
                                 "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "val").iterdir()) == ["blue", "green", "red"]
    foreign = tmp_path / "foreign"
    (foreign / "train" / "x").mkdir(parents=True)
    result = runner.invoke(cli, ["data", "crops", "--voc-root", str(devkit), "--split", "all", "--out", str(foreign)])
    assert result.exit_code == 1 and "refusing" in result.output and result.output.count("\n") == 1
    with pytest.raises(SppError, match="val-fraction"):
        crops.write_crops(tmp_path / "z", voc_root=devkit, split="all", val_fraction=1.0)
