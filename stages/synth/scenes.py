"""The synthetic dataset, its scenes: the classes, which image goes to which split with which guaranteed class
(``plan_images``), and rendering a detection image (``render_scene``: background, clutter, 1-5 objects placed so
none is hidden too much, occluding clutter, occlusion and difficulty measured) or a classification crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..core.errors import SppError
from .drawing import _background, _draw_clutter, _paint, _posed_shape, _rasterise, tight_box

CLASSES: tuple[str, ...] = ("disc", "box", "triangle", "star", "ring", "cross")
SPLIT_FRACTIONS = {"train": 0.4, "val": 0.2}  # the rest is test; trainval = train + val
SHORT_SIDE = (220, 300)  # image shorter side, pixels
IMAGE_ASPECT = (0.75, 1.33)  # width / height
OBJECTS_PER_IMAGE = (1, 2, 3, 4, 5)
OBJECTS_WEIGHTS = (0.2, 0.3, 0.25, 0.15, 0.1)
MIN_EXTENT = 20  # longer side of an object's box, pixels ...
MAX_EXTENT_FRACTION = 0.85  # ... up to this fraction of the image's shorter side
MIN_VISIBLE_TO_PLACE = 0.35  # re-draw a placement that would hide more of an earlier object than this allows
DIFFICULT_VISIBLE = 0.6  # difficult: less than this fraction of the mask visible ...
DIFFICULT_MIN_SIDE = 16  # ... or the box's shorter side below this ...
DIFFICULT_MAX_SIDE = 28  # ... or its longer side below this (pixels)
CROP_EXTENT = (28, 110)  # object size in classification crops, pixels
CROP_CONTEXT = (1.15, 1.9)  # crop side / object box side


@dataclass
class SceneObject:
    """One annotated object of a rendered scene."""

    label: int  # index into CLASSES
    mask: np.ndarray  # bool [H, W]: the shape as drawn, before occlusion, clipped to the image
    box: np.ndarray  # float64 [4]: tight box of ``mask``, 0-based [x1, y1, x2, y2)
    visible: float = 1.0  # fraction of ``mask`` not covered by later objects or clutter
    truncated: bool = False  # the shape extends past the image border
    difficult: bool = False


@dataclass
class Scene:
    image: np.ndarray  # RGB uint8 [H, W, 3]
    objects: list[SceneObject] = field(default_factory=list)


@dataclass(frozen=True)
class ImagePlan:
    image_id: str
    index: int  # 0-based, seeds the image's generator
    split: str  # train | val | test
    primary_label: int  # the first object's class, balanced within each split so every class appears


# -- planning -----------------------------------------------------------------------------------------------------
def plan_images(seed: int, images: int) -> list[ImagePlan]:
    """Image ids, their split and each image's guaranteed class (round-robin within a split)."""
    if images < 3:
        raise SppError(f"--images must be at least 3 (one per split), got {images}")
    rng = np.random.default_rng([seed, 0x5EED])
    n_train = max(1, round(images * SPLIT_FRACTIONS["train"]))
    n_val = max(1, round(images * SPLIT_FRACTIONS["val"]))
    n_val = min(n_val, images - n_train - 1)
    split_of = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (images - n_train - n_val))
    split_of = split_of[rng.permutation(images)]
    class_offset = {s: int(rng.integers(len(CLASSES))) for s in ("train", "val", "test")}
    seen = {s: 0 for s in class_offset}
    plans = []
    for index in range(images):
        split = str(split_of[index])
        primary = (seen[split] + class_offset[split]) % len(CLASSES)
        seen[split] += 1
        plans.append(ImagePlan(f"{index + 1:06d}", index, split, primary))
    return plans


# -- scenes -------------------------------------------------------------------------------------------------------
def _place_objects(rng: np.random.Generator, image: np.ndarray, labels: list[int],
                   extents: list[float], centres: list[tuple[float, float] | None],
                   min_visible: float = MIN_VISIBLE_TO_PLACE) -> tuple[list[SceneObject], np.ndarray]:
    """Draw objects back to front; re-draw a placement that would hide too much of an earlier object.

    Returns the objects and the owner map (index of the object each pixel shows, -1 for background)."""
    height, width = image.shape[:2]
    owner = np.full((height, width), -1, dtype=np.int16)  # which object each pixel shows
    placed: list[SceneObject] = []
    for label, extent, centre in zip(labels, extents, centres):
        for _attempt in range(25):
            outer, hole = _posed_shape(rng, CLASSES[label], extent, centre, height, width)
            mask = _rasterise(outer, hole, height, width)
            if mask.sum() < 16:
                continue
            ok = True
            for k, obj in enumerate(placed):
                still_visible = np.count_nonzero((owner == k) & ~mask)
                if still_visible < min_visible * np.count_nonzero(obj.mask):
                    ok = False
                    break
            if ok:
                break
        else:
            continue  # no room for this object: the image gets one fewer
        lo, hi = outer.min(axis=0), outer.max(axis=0)
        truncated = bool(lo[0] < 0 or lo[1] < 0 or hi[0] > width or hi[1] > height)
        obj = SceneObject(label=label, mask=mask, box=tight_box(mask), truncated=truncated)
        _paint(rng, image, mask, obj.box)
        owner[mask] = len(placed)
        placed.append(obj)
    return placed, owner


def _mark_occlusion(objects: list[SceneObject], owner: np.ndarray, covered: np.ndarray) -> None:
    """Measure what stays visible after later objects and clutter drawn on top; decide which are difficult."""
    for k, obj in enumerate(objects):
        obj.visible = np.count_nonzero((owner == k) & ~covered) / np.count_nonzero(obj.mask)
        side_w, side_h = obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]
        tiny = min(side_w, side_h) < DIFFICULT_MIN_SIDE or max(side_w, side_h) < DIFFICULT_MAX_SIDE
        obj.difficult = bool(obj.visible < DIFFICULT_VISIBLE or tiny)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-ish degradations (slight blur, sensor noise), then quantise to uint8."""
    if rng.random() < 0.4:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.0))
    image = image + rng.normal(0, rng.uniform(2, 7), image.shape[:2] + (1,)).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_scene(seed: int, plan: ImagePlan) -> Scene:
    """Render one detection image: background, clutter, 1-5 objects, occluding clutter."""
    rng = np.random.default_rng([seed, plan.index + 1])
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    aspect = math.exp(rng.uniform(*np.log(IMAGE_ASPECT)))
    height, width = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
    image = _background(rng, height, width)
    _draw_clutter(rng, image, int(rng.integers(3, 11)))
    count = int(rng.choice(OBJECTS_PER_IMAGE, p=OBJECTS_WEIGHTS))
    labels = [plan.primary_label] + [int(x) for x in rng.integers(len(CLASSES), size=count - 1)]
    max_extent = MAX_EXTENT_FRACTION * min(height, width)
    extents = [math.exp(rng.uniform(math.log(MIN_EXTENT), math.log(max_extent))) for _ in labels]
    extents[0] = max(extents[0], 1.5 * DIFFICULT_MAX_SIDE)  # the split-balancing object is never tiny
    objects, owner = _place_objects(rng, image, labels, extents, [None] * count)
    covered = _draw_clutter(rng, image, int(rng.integers(0, 4)), small=True)
    _mark_occlusion(objects, owner, covered)
    return Scene(_finish(rng, image), objects)


def render_image(seed: int, images: int, image_id: str) -> Scene:
    """Re-render one image of ``generate(out, seed, images)`` (with its masks), e.g. to check its boxes."""
    for plan in plan_images(seed, images):
        if plan.image_id == image_id:
            return render_scene(seed, plan)
    raise SppError(f"no image {image_id!r} among {images} generated images")


def render_crop(seed: int, split: str, label: int, index: int) -> np.ndarray:
    """One classification image: an object of class ``label`` with background context around it, maybe a
    truncated neighbour behind it and some clutter (RGB uint8, sides ~40-210 px, aspect 0.75-1.33)."""
    rng = np.random.default_rng([seed, 0xC809, 0 if split == "train" else 1, label, index])
    extent = math.exp(rng.uniform(*np.log(CROP_EXTENT)))
    long_side = extent * rng.uniform(*CROP_CONTEXT)
    aspect = math.exp(rng.uniform(*np.log(IMAGE_ASPECT)))
    height, width = (long_side / aspect, long_side) if aspect >= 1 else (long_side, long_side * aspect)
    height, width = max(int(round(height)), int(extent) + 2), max(int(round(width)), int(extent) + 2)
    image = _background(rng, height, width)
    _draw_clutter(rng, image, int(rng.integers(1, 5)))
    labels, extents, centres = [], [], []
    if rng.random() < 0.3:  # a neighbour of another class, centred on the border so it is cut off
        labels.append(int((label + rng.integers(1, len(CLASSES))) % len(CLASSES)))
        extents.append(extent * rng.uniform(0.5, 1.0))
        edge = rng.integers(4)
        cx = [0.0, width, rng.uniform(0, width), rng.uniform(0, width)][edge]
        cy = [rng.uniform(0, height), rng.uniform(0, height), 0.0, height][edge]
        centres.append((cx, cy))
    jitter = rng.uniform(-0.12, 0.12, 2) * (width, height)
    labels.append(label)
    extents.append(extent)
    centres.append((width / 2 + jitter[0], height / 2 + jitter[1]))
    _place_objects(rng, image, labels, extents, centres, min_visible=0.0)
    _draw_clutter(rng, image, int(rng.integers(0, 2)), small=True)
    return _finish(rng, image)
