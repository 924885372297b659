"""``spp bench``, what it times on: the images (the run's dataset, else synthetic random textures), the windows
(the run's proposals, live selective search, or seeded random boxes) and the weights (the run's pretrained
SppNet, else a seeded random init) that all three modes share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from ..core import nets
from ..core.artifacts import Run
from ..core.errors import SppError, StageInputMissing

SYNTH_IMAGE_HW = (375, 500)  # a typical VOC image (height, width)
MIN_BOX_SIDE = 20  # smallest random box side, like selective search's filter (SPEC §3)


def _texture_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random-texture RGB uint8 image: noise summed over several octaves (smooth blobs to fine grain)."""
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 1.0), (16, 0.6), (64, 0.35), (256, 0.2)):
        small = rng.random((max(2, cells * height // max(height, width)), max(2, cells * width // max(height, width)),
                            3)).astype(np.float32)
        canvas += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas += 0.15 * rng.random((height, width, 3), dtype=np.float32)  # pixel-level grain
    canvas -= canvas.min()
    return np.ascontiguousarray((255.0 * canvas / max(float(canvas.max()), 1e-6)).astype(np.uint8))


def random_boxes(rng: np.random.Generator, image_hw: tuple[int, int], count: int,
                 min_side: int = MIN_BOX_SIDE) -> np.ndarray:
    """``count`` boxes inside the image with a proposal-like size distribution: side sqrt(w h) log-uniform from
    ``min_side`` to the image's geometric mean side, aspect w/h log-uniform in [1/3, 3]; float64 [count, 4]."""
    height, width = (int(v) for v in image_hw)
    low = min(float(min_side), float(min(height, width)))
    side = np.exp(rng.uniform(math.log(low), math.log(max(low, math.sqrt(height * width))), count))
    aspect = np.exp(rng.uniform(math.log(1 / 3), math.log(3), count))
    box_w = np.clip(side * np.sqrt(aspect), low, width)
    box_h = np.clip(side / np.sqrt(aspect), low, height)
    x1 = rng.uniform(0, 1, count) * (width - box_w)
    y1 = rng.uniform(0, 1, count) * (height - box_h)
    return np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1)


@dataclass
class BenchInputs:
    images: list[tuple[str, np.ndarray]]
    boxes: list[np.ndarray]
    image_source: str
    box_source: str


def bench_inputs(cfg, run: Run, n_images: int, windows: int,
                 synth_hw: tuple[int, int] = SYNTH_IMAGE_HW) -> BenchInputs:
    """The run's dataset images (its test split) when the dataset is there, else synthetic random-texture images;
    the run's stored proposals, else live selective search on dataset images, else seeded random boxes. Every
    image gets exactly ``windows`` boxes (topped up with random boxes, and said so, when proposals run short)."""
    from ..core.voc import VocDataset
    from ..core.proposals import image_seed, load_proposals, selective_search

    rng = np.random.default_rng(cfg.seed)
    dataset = None
    try:
        dataset = VocDataset.from_config(cfg.data)
        image_ids = dataset.image_ids(cfg.data.test_split)[:n_images]
    except SppError:
        dataset = None
    if dataset is None:
        images = [(f"synthetic{k}", _texture_image(rng, *synth_hw)) for k in range(n_images)]
        image_source = f"{n_images} synthetic random-texture images {synth_hw[1]}x{synth_hw[0]} (no dataset found)"
        boxes = [random_boxes(rng, synth_hw, windows) for _ in images]
        box_source = f"{windows} seeded random boxes/image (log-uniform size {MIN_BOX_SIDE} px..image, aspect 1/3..3)"
        return BenchInputs(images, boxes, image_source, box_source)

    images = [(image_id, dataset.load_image(image_id)) for image_id in image_ids]
    image_source = (f"{len(images)} images of {cfg.data.dataset} {cfg.data.test_split} "
                    f"({dataset.devkit_root}), mean size {_mean_size(images)}")
    store = None
    with contextlib.suppress(SppError):  # not run, stale or unreadable: propose live instead
        store = load_proposals(run, cfg.data.test_split)
    live_params = dataclasses.replace(cfg.proposals, max_boxes=windows)
    boxes, topped_up = [], 0
    for image_id, image in images:
        if store is not None and image_id in store:
            found = store.boxes(image_id)
        else:
            found = selective_search(image, live_params, seed=image_seed(cfg.seed, image_id))
        found = found[:windows]
        if len(found) < windows:
            topped_up += windows - len(found)
            found = np.concatenate([found, random_boxes(rng, image.shape[:2], windows - len(found))])
        boxes.append(found)
    if store is not None:
        store.close()
    method = "stored selective-search proposals of the run" if store is not None else "selective search, run live"
    box_source = f"{windows} windows/image: {method}"
    if topped_up:
        box_source += f" (topped up with {topped_up} seeded random boxes in all where fewer were found)"
    return BenchInputs(images, boxes, image_source, box_source)


def _mean_size(images: list[tuple[str, np.ndarray]]) -> str:
    heights = [im.shape[0] for _, im in images]
    widths = [im.shape[1] for _, im in images]
    return f"{statistics.mean(widths):.0f}x{statistics.mean(heights):.0f}"


def bench_model(cfg, run: Run) -> tuple[nets.SppNet, str]:
    """The run's pretrained SppNet when ``spp pretrain`` has finished, else a seeded random-init one (the same
    weights for every mode either way)."""
    try:
        manifest = run.require("pretrain")
    except StageInputMissing:
        manifest = None
    if manifest is not None:
        try:
            path = manifest.output("model")
        except SppError:
            path = manifest.folder / "model.pt"
        model, _meta = nets.load_checkpoint(path, expect_backbone=cfg.model.backbone)
        return model, f"pretrained checkpoint {path}"
    torch.manual_seed(cfg.seed)
    model = nets.build_sppnet(cfg.model.backbone, cfg.model.weights, cfg.model.pyramid, cfg.model.fc_dim,
                              num_classes=1000, dropout=cfg.model.dropout, width=cfg.model.width)
    trunk = f"trunk weights {cfg.model.weights}" if cfg.model.weights else "random init"
    return model, f"{trunk} (seed {cfg.seed}; no pretrain checkpoint in {run.root})"


# ------------------------------------------------------------------------------------------------ the benchmark
