"""The synthetic dataset, its drawing: colours and textures, backgrounds, the six class shapes (posed, then
rasterised with ``cv2.fillPoly`` as exact binary masks, and painted so they stand out), and distractor clutter.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

SHAPE_ASPECT = (0.6, 1.67)  # x/y stretch of the unit shape before rotation
MAX_OVERHANG = 0.2  # an object may stick out of the image by this fraction of its box side
MIN_CONTRAST = 60.0  # RGB distance between an object's mean colour and the background under it


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
