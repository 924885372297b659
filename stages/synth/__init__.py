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

The code: this package's ``__init__`` writes the dataset (``generate``: staging folder, VOC files, crops,
``SYNTH.json``); ``scenes.py`` plans and renders the images; ``drawing.py`` draws their shapes, textures and
clutter.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..core.artifacts import atomic_write_json
from ..core.errors import SppError
from ..core.voc import Annotation, annotation_xml, encode_jpeg
from .drawing import tight_box
from .scenes import CLASSES, ImagePlan, Scene, SceneObject, plan_images, render_crop, render_image, render_scene

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
# 288 trainval images (about 130 objects per class) and 192 test images. With 240 images the SVMs, fine-tuning
# and box regression saw ~65 objects per class: 600 images raised ftfc7 mAP from 26.1 / 28.9 to 29.9 / 38.7
# (1 / 5 scales); 480 keeps `make all` well inside its 15 minutes on 2 cores.
DEFAULT_IMAGES = 480
# Pretraining from scratch is data-starved well before it is compute-starved: on 160 crops per class ZF-5 reached
# 35% val accuracy in its CPU budget, on 1,000 (18 s to generate) 55% in about the same time.
CROPS_TRAIN_PER_CLASS = 1000

__all__ = ["GENERATOR_VERSION", "CLASSES", "JPEG_QUALITY", "DEFAULT_IMAGES", "CROPS_TRAIN_PER_CLASS", "generate",
           "synth_info", "plan_images", "render_scene", "render_image", "render_crop", "tight_box", "ImagePlan",
           "Scene", "SceneObject"]


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
