"""Shared fixtures: tiny VOC devkits written on the fly, a tiny run ready for fine-tuning, CPU-only, quiet threads."""
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


# The tiny fine-tuning run's config (tiny_run).
E2E = {"device": "cpu", "data.dataset": "voc2007", "proposals.workers": 1, "proposals.min_side": 4,
       "features.scales": [128, 192], "model.fc_dim": 32, "finetune.iters": 150, "finetune.lr": 0.01,
       "finetune.lr_steps": [120], "finetune.batch_size": 16, "finetune.eval_every": 30,
       "finetune.holdout_batches": 4, "finetune.holdout_fraction": 0.34, "model.dropout": 0.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run ready for ``spp finetune`` (test_finetune, test_launch): imported proposals, a 'pretrained' random
    ZF-5 (see below) and the trainval conv5 cache with flips: 6 images of a red and a green rectangle, config
    ``E2E`` (saved in the run). Returns (runs_root, devkit)."""
    from stages import extract_features, proposals
    from stages.core import nets
    from stages.core.artifacts import Run
    from stages.core.config import build_config

    tmp = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    images, boxes_voc = {}, {}
    for k in range(6):
        img = (rng.random((64, 80, 3)) * 60).astype(np.uint8)
        x0 = 8 + 2 * k
        img[10:40, x0:x0 + 38] = (200, 30, 30)
        img[45:60, 55:75] = (30, 200, 30)
        objects = [("red", (x0 + 1, 11, x0 + 38, 40), False), ("green", (56, 46, 75, 60), k == 3)]
        images[f"im{k}"] = (img, objects)
        # Proposals (1-based inclusive): near-copies of each GT (foreground) and wider jitter (mostly background).
        props = [np.array(b, float) + rng.normal(0, 2, (8, 4)) for _, b, _ in objects]
        props += [np.array(b, float) + rng.uniform(-18, 18, (16, 4)) for _, b, _ in objects]
        props = np.vstack(props)
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 6)
        boxes_voc[f"im{k}"] = np.clip(props, 1, [80, 64, 80, 64])
    devkit = write_devkit(tmp / "devkit", images, {"trainval": list(images), "test": ["im0"]},
                          classes=("red", "green"))
    np.savez(tmp / "boxes.npz", **boxes_voc)
    cfg = build_config(None, {**E2E, "runs_root": str(tmp / "runs"), "run": "base", "data.voc_root": str(devkit)})
    run = Run(cfg.run_dir)
    proposals.run(cfg, "trainval", boxes_file=tmp / "boxes.npz")
    torch.manual_seed(0)
    # Stand-in for a pretrained net: random ZF-5 with conv5 scaled so that pooled features have norms ~20 (what
    # fc6 of a trained net sees) and He-initialised fc6/fc7 that pass the signal on. Its dropout (pretraining's)
    # is not the one fine-tuning uses: that is model.dropout, 0 on 32 units (E2E).
    net = nets.build_sppnet("zf5", fc_dim=32, num_classes=5, dropout=0.3, class_names=tuple("abcde"))
    with torch.no_grad():
        net.backbone.body.conv5.weight.mul_(nets.ZF5_PIXEL_STD / 75)  # undo conv1's input-scale init, then / 75
    for layer in (net.head.fc6, net.head.fc7):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    folder = run.stage_dir("pretrain")
    folder.mkdir(parents=True, exist_ok=True)
    nets.save_checkpoint(folder / "model.pt", net, {})
    run.write_manifest("pretrain", None, config={"test": True}, inputs={}, outputs={"model": "model.pt"})
    extract_features.run(cfg, "trainval")
    return tmp / "runs", devkit
