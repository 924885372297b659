"""The embedded default dataset: generated detection scenes in VOC2007 layout, plus a classification set.

``spp data synth --out DIR`` writes

- ``DIR/VOC2007/{JPEGImages,Annotations,ImageSets/Main}/`` and ``classes.txt`` (read by ``voc.VocDataset``):
  scenes of 1-5 objects from six shape families on textured backgrounds with distractor clutter;
- ``DIR/classification/{train,val}/<class>/*.jpg``: object crops with context, an ImageFolder tree for
  ``spp pretrain`` (the stand-in for ImageNet pretraining);
- ``DIR/SYNTH.json``: seed, counts, classes and generator version, written last.

Design choices:

- Colour never identifies a class: every object's colours, texture and outline are drawn independently of its
  class, so a detector has to learn shape. Distractor clutter (lines, arcs, zigzags, irregular blobs, chevrons,
  half-discs) is drawn under the objects, and a little of it over them, as hard negatives and occluders.
- Every object is rasterised as a binary mask with ``cv2.fillPoly`` (no anti-aliasing), so its box is exactly the
  tight extent of the shape as drawn, before occlusion, clipped to the image (``Scene.objects[i].mask``).
- An object is ``difficult`` when less than 60% of it stays visible (occluded by later objects or clutter) or
  when it is tiny; placements that would hide more than 65% of an earlier object are re-drawn.
- Deterministic: each image draws from its own ``numpy`` Generator seeded with ``(seed, index)``, OpenCV draws
  without randomness and JPEGs are written at a fixed quality, so a seed gives the same bytes every time.
- The dataset is built in a staging folder inside ``DIR`` and swapped in only when complete; a folder that
  holds a ``VOC2007/`` not made by this generator is never overwritten.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .core.artifacts import atomic_write_json
from .core.errors import SppError
from .core.voc import Annotation, annotation_xml, encode_jpeg

GENERATOR_VERSION = 1
CLASSES: tuple[str, ...] = ("disc", "box", "triangle", "star", "ring", "cross")
SPLIT_FRACTIONS = {"train": 0.4, "val": 0.2}  # the rest is test; trainval = train + val
JPEG_QUALITY = 90
SHORT_SIDE = (220, 300)  # image shorter side, pixels
IMAGE_ASPECT = (0.75, 1.33)  # width / height
OBJECTS_PER_IMAGE = (1, 2, 3, 4, 5)
OBJECTS_WEIGHTS = (0.2, 0.3, 0.25, 0.15, 0.1)
MIN_EXTENT = 20  # longer side of an object's box, pixels ...
MAX_EXTENT_FRACTION = 0.85  # ... up to this fraction of the image's shorter side
SHAPE_ASPECT = (0.6, 1.67)  # x/y stretch of the unit shape before rotation
MAX_OVERHANG = 0.2  # an object may stick out of the image by this fraction of its box side
MIN_VISIBLE_TO_PLACE = 0.35  # re-draw a placement that would hide more of an earlier object than this allows
DIFFICULT_VISIBLE = 0.6  # difficult: less than this fraction of the mask visible ...
DIFFICULT_MIN_SIDE = 16  # ... or the box's shorter side below this ...
DIFFICULT_MAX_SIDE = 28  # ... or its longer side below this (pixels)
MIN_CONTRAST = 60.0  # RGB distance between an object's mean colour and the background under it
# 288 trainval images (about 130 objects per class) and 192 test images. With 240 images the SVMs, fine-tuning
# and box regression saw ~65 objects per class: 600 images raised ftfc7 mAP from 26.1 / 28.9 to 29.9 / 38.7
# (1 / 5 scales); 480 keeps `make all` well inside its 15 minutes on 2 cores.
DEFAULT_IMAGES = 480
# Pretraining from scratch is data-starved well before it is compute-starved: on 160 crops per class ZF-5 reached
# 35% val accuracy in its CPU budget, on 1,000 (18 s to generate) 55% in about the same time.
CROPS_TRAIN_PER_CLASS = 1000
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


# -- colours and textures -----------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour from the whole HSV range, greys included (float32 [3])."""
    hue = rng.uniform(0, 180)
    sat = 0.0 if rng.random() < 0.12 else rng.uniform(0.25, 1.0)
    val = rng.uniform(0.15, 1.0)
    hsv = np.array([[[hue * 2, sat, val]]], dtype=np.float32)  # float HSV: H in degrees, S and V in [0, 1]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255


def _related_colour(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A second texture colour: usually a lighter/darker or hue-shifted version of ``colour``."""
    if rng.random() < 0.3:
        return _random_colour(rng)
    shift = rng.uniform(40, 110) * rng.choice([-1.0, 1.0])
    jitter = rng.normal(0, 25, 3)
    return np.clip(colour + shift + jitter, 0, 255).astype(np.float32)


def _rotated_coords(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grids rotated by a random angle (u along the pattern, v across)."""
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    return xs * ca + ys * sa, -xs * sa + ys * ca


def _low_frequency_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int = 3,
                         ) -> np.ndarray:
    grid = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return out.reshape(height, width, channels)


def _texture(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """A patch of one of five textures (solid, stripes, checks, noise, gradient) around ``colour``."""
    kind = rng.choice(["solid", "stripes", "checks", "noise", "gradient"], p=[0.3, 0.2, 0.15, 0.15, 0.2])
    other = _related_colour(rng, colour)
    if kind == "solid":
        patch = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
        patch = patch + rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    elif kind == "stripes":
        u, _ = _rotated_coords(rng, height, width)
        period = rng.uniform(4, 16)
        on = (np.mod(u, period) < period / 2)[..., None]
        patch = np.where(on, colour, other).astype(np.float32)
    elif kind == "checks":
        u, v = _rotated_coords(rng, height, width)
        cell = rng.uniform(3, 12)
        on = ((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0)[..., None]
        patch = np.where(on, colour, other).astype(np.float32)
    elif kind == "noise":
        grain = rng.normal(0, rng.uniform(12, 35), (height, width, 1)).astype(np.float32)
        blur = rng.choice([0.0, 0.8, 1.5])
        if blur:
            grain = cv2.GaussianBlur(grain, (0, 0), blur)[..., None]
        patch = colour + grain
    else:  # gradient
        u, _ = _rotated_coords(rng, height, width)
        span = max(float(u.max() - u.min()), 1.0)
        t = ((u - u.min()) / span)[..., None]
        patch = colour * (1 - t) + other * t
    return patch


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + low-frequency colour blotches + an optional faint pattern (float32 RGB)."""
    a, b = _random_colour(rng), _random_colour(rng)
    u, _ = _rotated_coords(rng, height, width)
    t = ((u - u.min()) / max(float(u.max() - u.min()), 1.0))[..., None]
    image = a * (1 - t) + b * t
    image = image + _low_frequency_noise(rng, height, width, int(rng.integers(3, 8))) * rng.uniform(10, 40)
    pattern = rng.choice(["none", "grain", "stripes", "checks", "waves"], p=[0.25, 0.3, 0.15, 0.15, 0.15])
    strength = rng.uniform(6, 22)
    if pattern == "grain":
        image = image + rng.normal(0, strength, (height, width, 1))
    elif pattern == "stripes":
        u, _ = _rotated_coords(rng, height, width)
        period = rng.uniform(5, 30)
        image = image + strength * np.where(np.mod(u, period) < period / 2, 1.0, -1.0)[..., None]
    elif pattern == "checks":
        u, v = _rotated_coords(rng, height, width)
        cell = rng.uniform(6, 30)
        image = image + strength * np.where((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0, 1.0, -1.0)[..., None]
    elif pattern == "waves":
        u, v = _rotated_coords(rng, height, width)
        image = image + strength * np.sin(u / rng.uniform(3, 10) + 2 * np.sin(v / rng.uniform(10, 40)))[..., None]
    return image.astype(np.float32)


# -- shapes -------------------------------------------------------------------------------------------------------
def _unit_shape(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer contour (and hole contour, for the ring) of a class's shape, centred near 0 with radius ~1."""
    if name in ("disc", "ring"):
        t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        hole = outer * rng.uniform(0.45, 0.7) if name == "ring" else None
        return outer, hole
    if name == "box":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64), None
    if name == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], axis=1), None
    if name == "star":
        t = np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.52))
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1), None
    if name == "cross":
        w = rng.uniform(0.22, 0.38)
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
        return np.array(pts, dtype=np.float64), None
    raise ValueError(name)


def _posed_shape(rng: np.random.Generator, name: str, extent: float, centre: tuple[float, float] | None,
                 height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The shape stretched, rotated and scaled so its box's longer side is ``extent``, then placed.

    With ``centre`` None the centre is drawn so that at most MAX_OVERHANG of the box sticks out of the image."""
    outer, hole = _unit_shape(rng, name)
    stretch = math.exp(rng.uniform(*np.log(SHAPE_ASPECT)))
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = np.array([math.sqrt(stretch), 1 / math.sqrt(stretch)])
    outer = (outer * scale) @ rot.T
    hole = None if hole is None else (hole * scale) @ rot.T
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    factor = extent / float((hi - lo).max())
    mid = (lo + hi) / 2
    size = (hi - lo) * factor
    if centre is None:
        cx = rng.uniform(size[0] * (0.5 - MAX_OVERHANG), width - size[0] * (0.5 - MAX_OVERHANG))
        cy = rng.uniform(size[1] * (0.5 - MAX_OVERHANG), height - size[1] * (0.5 - MAX_OVERHANG))
        centre = (cx, cy)
    offset = np.asarray(centre) - mid * factor
    return outer * factor + offset, (None if hole is None else hole * factor + offset)


_SHIFT = 4  # fillPoly sub-pixel bits: vertices at 1/16 pixel


def _fill(mask: np.ndarray, contour: np.ndarray, value: int) -> None:
    # Pixel (i, j) covers [j, j+1) x [i, i+1); fillPoly samples pixel centres at integer coordinates.
    pts = np.round((contour - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], value, lineType=cv2.LINE_8, shift=_SHIFT)


def _rasterise(outer: np.ndarray, hole: np.ndarray | None, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    _fill(mask, outer, 1)
    if hole is not None:
        _fill(mask, hole, 0)
    return mask.astype(bool)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """0-based ``[x1, y1, x2, y2)`` of a non-empty boolean mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, box: np.ndarray) -> None:
    """Fill ``mask`` with a textured colour that stands out from what lies under it; sometimes outlined."""
    x1, y1, x2, y2 = box.astype(int)
    region = mask[y1:y2, x1:x2]
    under = image[y1:y2, x1:x2][region].mean(axis=0)
    colour = _random_colour(rng)
    for _ in range(12):  # keep the object findable: its colour must differ from the background under it
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
        colour = _random_colour(rng)
    patch = _texture(rng, y2 - y1, x2 - x1, colour)
    if rng.random() < 0.3 and min(y2 - y1, x2 - x1) >= 12:
        thickness = int(rng.integers(1, 3))
        inner = cv2.erode(region.astype(np.uint8), np.ones((2 * thickness + 1,) * 2, np.uint8))
        rim = region & ~inner.astype(bool)
        patch = patch.copy()
        patch[rim] = colour * rng.uniform(0.2, 0.5)
    view = image[y1:y2, x1:x2]
    view[region] = patch[region]


# -- clutter ------------------------------------------------------------------------------------------------------
def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int, small: bool = False) -> np.ndarray:
    """Draw ``count`` distractors that belong to no class; returns the mask of pixels they cover."""
    height, width = image.shape[:2]
    covered = np.zeros((height, width), dtype=np.uint8)
    kinds = ["line", "zigzag", "arc", "blob", "chevron", "halfdisc", "dots"]
    weights = [0.25, 0.12, 0.15, 0.2, 0.1, 0.08, 0.1] if not small else [0.45, 0.1, 0.15, 0.15, 0.0, 0.0, 0.15]
    for _ in range(count):
        kind = rng.choice(kinds, p=weights)
        layer = np.zeros((height, width), dtype=np.uint8)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(6, 28) if small else rng.uniform(8, 45)
        if kind == "line":
            length = max(width, height) * (0.5 if small else 1.0) * rng.uniform(0.15, 1.0)
            theta = rng.uniform(0, math.pi)
            dx, dy = length / 2 * math.cos(theta), length / 2 * math.sin(theta)
            cv2.line(layer, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1,
                     int(rng.integers(1, 3 if small else 5)))
        elif kind == "zigzag":
            steps = rng.normal(0, size, (int(rng.integers(3, 7)), 2)).cumsum(axis=0) + (cx, cy)
            cv2.polylines(layer, [steps.astype(np.int32)], False, 1, int(rng.integers(1, 4)))
        elif kind == "arc":
            start = rng.uniform(0, 360)
            cv2.ellipse(layer, (int(cx), int(cy)), (int(size), int(size * rng.uniform(0.5, 1.0))),
                        rng.uniform(0, 180), start, start + rng.uniform(60, 200), 1, int(rng.integers(2, 6)))
        elif kind == "blob":  # irregular, smooth, star-convex: like no class shape
            t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            radius = np.ones_like(t)
            for k in (2, 3, 4):
                radius += rng.uniform(-0.25, 0.25) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
            pts = np.stack([cx + size * 0.6 * radius * np.cos(t), cy + size * 0.6 * radius * np.sin(t)], axis=1)
            _fill(layer, pts, 1)
        elif kind == "chevron":
            w = size * 0.7
            pts = np.array([[cx - w, cy - w / 2], [cx, cy + w / 2], [cx + w, cy - w / 2]], dtype=np.int32)
            cv2.polylines(layer, [pts], False, 1, int(rng.integers(3, 7)))
        elif kind == "halfdisc":
            cv2.ellipse(layer, (int(cx), int(cy)), (int(size * 0.6),) * 2, rng.uniform(0, 360), 0, 180, 1, -1)
        else:  # dots
            for _ in range(int(rng.integers(3, 9))):
                centre = (int(cx + rng.normal(0, size)), int(cy + rng.normal(0, size)))
                cv2.circle(layer, centre, int(rng.integers(1, 4)), 1, -1)
        drawn = layer.astype(bool)
        if not drawn.any():
            continue
        colour = _random_colour(rng)
        if kind == "blob" and rng.random() < 0.5:
            x1, y1, x2, y2 = tight_box(drawn).astype(int)
            patch = _texture(rng, y2 - y1, x2 - x1, colour)
            image[y1:y2, x1:x2][drawn[y1:y2, x1:x2]] = patch[drawn[y1:y2, x1:x2]]
        else:
            image[drawn] = colour
        covered |= layer
    return covered.astype(bool)


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


# -- writing ------------------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    # Plain writes inside the staging folder (fsync per file would dominate the run time); the folder is
    # swapped in only when complete, which is what keeps a half-written dataset from ever being read.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_detection_set(stage: Path, seed: int, plans: list[ImagePlan]) -> dict:
    voc = stage / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    stats = {"objects": 0, "difficult": 0, "truncated": 0, "per_class": {c: 0 for c in CLASSES}}
    for plan in plans:
        scene = render_scene(seed, plan)
        height, width = scene.image.shape[:2]
        ann = Annotation(
            image_id=plan.image_id, width=width, height=height,
            boxes=np.array([o.box for o in scene.objects], dtype=np.float64).reshape(-1, 4),
            labels=np.array([o.label for o in scene.objects], dtype=np.int64),
            difficult=np.array([o.difficult for o in scene.objects], dtype=bool),
        )
        _write(voc / "JPEGImages" / f"{plan.image_id}.jpg", encode_jpeg(scene.image, JPEG_QUALITY))
        _write(voc / "Annotations" / f"{plan.image_id}.xml", annotation_xml(ann, CLASSES))
        stats["objects"] += len(scene.objects)
        stats["difficult"] += int(ann.difficult.sum())
        stats["truncated"] += sum(o.truncated for o in scene.objects)
        for o in scene.objects:
            stats["per_class"][CLASSES[o.label]] += 1
    splits = {s: [p.image_id for p in plans if p.split == s] for s in ("train", "val", "test")}
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    for name, ids in splits.items():
        _write(voc / "ImageSets" / "Main" / f"{name}.txt", "".join(f"{i}\n" for i in ids).encode())
    _write(voc / "classes.txt", "".join(f"{c}\n" for c in CLASSES).encode())
    stats["splits"] = {name: len(ids) for name, ids in splits.items()}
    return stats


def _write_classification_set(stage: Path, seed: int, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = stage / "classification" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                crop = render_crop(seed, split, label, index)
                _write(folder / f"{name}_{index:05d}.jpg", encode_jpeg(crop, JPEG_QUALITY))


def _swap_in(stage: Path, out: Path, names: tuple[str, ...]) -> None:
    """Replace ``out/<name>`` by ``stage/<name>`` (old copies move into the staging folder, deleted after)."""
    for name in names:
        target = out / name
        if target.exists():
            target.rename(stage / f"old-{name}")
        (stage / name).rename(target)


def generate(out: Path, seed: int = 0, images: int = DEFAULT_IMAGES, *, crops_per_class: int | None = None) -> str:
    """Write the synthetic dataset under ``out`` (see the module docstring); returns a one-paragraph summary.

    ``crops_per_class`` is the classification set's train images per class (default ``CROPS_TRAIN_PER_CLASS``;
    val gets a quarter)."""
    start = time.perf_counter()
    out = Path(out)
    if (out / "VOC2007").exists() and not (out / "SYNTH.json").exists():
        raise SppError("holds a VOC2007/ folder that this generator did not write; refusing to overwrite it "
                       "(choose another --out)", out)
    train_crops = CROPS_TRAIN_PER_CLASS if crops_per_class is None else int(crops_per_class)
    if train_crops < 1:
        raise SppError(f"crops per class must be at least 1, got {train_crops}")
    crops = {"train": train_crops, "val": max(1, train_crops // 4)}
    plans = plan_images(seed, images)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".synth-staging-*"):  # left by an interrupted run of this generator
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".synth-staging-{seed}-{images}"
    stage.mkdir()
    try:
        stats = _write_detection_set(stage, seed, plans)
        _write_classification_set(stage, seed, crops)
        (out / "SYNTH.json").unlink(missing_ok=True)  # not a finished dataset while folders are swapped
        _swap_in(stage, out, ("VOC2007", "classification"))
        info = {
            "generator": "sppnet.stages.synth", "version": GENERATOR_VERSION, "seed": seed, "images": images,
            "classes": list(CLASSES), "splits": stats["splits"], "objects": stats["objects"],
            "difficult": stats["difficult"], "truncated": stats["truncated"], "per_class": stats["per_class"],
            "classification_per_class": crops,
        }
        atomic_write_json(out / "SYNTH.json", info)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    seconds = time.perf_counter() - start
    s = stats["splits"]
    return (f"wrote {images} detection images to {out / 'VOC2007'} (train {s['train']}, val {s['val']}, "
            f"trainval {s['trainval']}, test {s['test']}) with {stats['objects']} objects of {len(CLASSES)} "
            f"shape classes ({', '.join(CLASSES)}; {stats['difficult']} difficult, {stats['truncated']} "
            f"truncated), and {train_crops * len(CLASSES)} train + {crops['val'] * len(CLASSES)} val "
            f"classification crops to {out / 'classification'}; seed {seed}, generator v{GENERATOR_VERSION}, "
            f"{seconds:.1f} s.")


def synth_info(out: Path) -> dict:
    """The ``SYNTH.json`` of a generated dataset (one-line error if it is missing or unreadable)."""
    path = Path(out) / "SYNTH.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SppError("no SYNTH.json: not a finished synthetic dataset", path) from None
    except (OSError, ValueError) as exc:
        raise SppError(f"unreadable SYNTH.json ({exc})", path) from None
