"""Shared fixtures: tiny VOC devkits written on the fly, CPU-only, quiet threads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.voc import Annotation, annotation_xml

torch.set_num_threads(1)


def write_devkit(root: Path, images: dict[str, tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int], bool]]]],
                 splits: dict[str, list[str]], classes: tuple[str, ...] | None = None) -> Path:
    """Write a minimal VOCdevkit: ``images`` maps id -> (RGB uint8 image, [(class, (xmin,ymin,xmax,ymax) 1-based, difficult)])."""
    import cv2

    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (voc / "classes.txt").write_text("\n".join(classes) + "\n")
    class_list = classes or tuple(sorted({name for _, objs in images.values() for name, _, _ in objs}))
    for image_id, (pixels, objects) in images.items():
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        boxes = np.array([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in objects], dtype=np.float64).reshape(-1, 4)
        ann = Annotation(image_id, pixels.shape[1], pixels.shape[0], boxes,
                         np.array([class_list.index(n) for n, _, _ in objects], dtype=np.int64),
                         np.array([d for _, _, d in objects], dtype=bool))
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(annotation_xml(ann, class_list))
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def tiny_devkit(tmp_path: Path) -> Path:
    """Three 64x80 images with rectangles of two classes; splits train/test/trainval."""
    rng = np.random.default_rng(0)
    images = {}
    for k in range(3):
        img = (rng.random((64, 80, 3)) * 60).astype(np.uint8)
        img[10:40, 12:50] = (200, 30, 30)
        img[45:60, 55:75] = (30, 200, 30)
        images[f"img{k}"] = (img, [("red", (13, 11, 50, 40), False), ("green", (56, 46, 75, 60), k == 2)])
    return write_devkit(tmp_path / "devkit", images, {"train": ["img0", "img1"], "test": ["img2"],
                                                      "trainval": ["img0", "img1"]}, classes=("red", "green"))


def jittered_and_random_proposals(rng, objects, width: int = 96, height: int = 72) -> np.ndarray:
    """Proposals for a test image, VOC 1-based inclusive float64: 3 jittered copies of each GT box (regression
    samples, foreground) and 25 random boxes (mostly negatives), clipped to the image."""
    jitter = [np.array(b, float) + rng.integers(-3, 4, 4) for _, b, _ in objects for _ in range(3)]
    x1, y1 = rng.integers(1, 60, 25), rng.integers(1, 40, 25)
    rand = np.stack([x1, y1, np.minimum(x1 + rng.integers(20, 40, 25), width),
                     np.minimum(y1 + rng.integers(20, 30, 25), height)], 1)
    return np.clip(np.vstack(jitter + [rand]), 1, [width, height, width, height]).astype(np.float64)
