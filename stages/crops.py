"""Ground-truth object crops of a VOC split as an ImageFolder classification set, for ``spp pretrain``.

SPP-net pretrains its trunk on ImageNet classification. Where no such set exists (ZF-5 from scratch on VOC),
``spp data crops`` turns a detection split into a small stand-in:

- every non-difficult ground-truth box of the split, grown by ``context`` of its width and height on each side
  (clipped to the image), cut out and resized so that its shorter side is ``short_side`` pixels (a box more
  elongated than ``MAX_ASPECT`` is squeezed to that aspect, so no file is absurdly long);
- written as ``OUT/{train,val}/<class>/<image_id>_<k>.jpg`` (``k`` = the object's index in its annotation);
- the train/val division is made by *image*: the split's images are shuffled with ``seed`` and the first
  ``round(val_fraction * n)`` go to ``val/``, so crops of one image are never in both halves and the same
  inputs always give the same division. A class that ends up with crops in only one half is left out of both
  (``spp pretrain`` needs the same class folders in ``train/`` and ``val/``) and named in the summary;
- ``OUT/CROPS.json`` (parameters, the split's fingerprint, counts) is written last. The tree is built in a
  staging folder inside ``OUT`` and swapped in only when complete; a rerun with the same inputs and parameters
  does nothing, and a folder that holds ``train/`` or ``val/`` not made by this command is never overwritten.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from .core.artifacts import atomic_write_json
from .core.errors import SppError
from .core.voc import Annotation, VocDataset, encode_jpeg, resolve_voc_root

CROPS_VERSION = 1
INFO_NAME = "CROPS.json"
JPEG_QUALITY = 90
MAX_ASPECT = 4.0  # longer side / shorter side of a written crop at most


def crop_box(box: np.ndarray, width: int, height: int, context: float) -> tuple[int, int, int, int]:
    """Integer pixel rectangle ``[x1, y1, x2, y2)`` of ``box`` (0-based ``[x1, y1, x2, y2)`` floats) grown by
    ``context`` of its width/height on each side, clipped to the image; never empty."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = context * (x2 - x1), context * (y2 - y1)
    left = int(np.clip(np.floor(x1 - dx), 0, width - 1))
    top = int(np.clip(np.floor(y1 - dy), 0, height - 1))
    right = int(np.clip(np.ceil(x2 + dx), left + 1, width))
    bottom = int(np.clip(np.ceil(y2 + dy), top + 1, height))
    return left, top, right, bottom


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so that the shorter side is ``short_side`` and the aspect is at most ``MAX_ASPECT``."""
    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    long_cap = int(round(MAX_ASPECT * short_side))
    new_w = min(max(1, int(round(width * scale))), long_cap)
    new_h = min(max(1, int(round(height * scale))), long_cap)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def divide_images(image_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, val ids) by image: a seeded shuffle of the sorted ids, the first ``round(f * n)`` to val
    (at least one to each half)."""
    if len(image_ids) < 2:
        raise SppError(f"a train/val division needs at least 2 images, the split has {len(image_ids)}")
    ordered = sorted(image_ids)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_val = min(max(1, int(np.floor(val_fraction * len(ordered) + 0.5))), len(ordered) - 1)
    val = sorted(ordered[i] for i in order[:n_val])
    train = sorted(ordered[i] for i in order[n_val:])
    return train, val


def _objects(ann: Annotation) -> list[int]:
    return [k for k in range(len(ann)) if not ann.difficult[k]]


def _params(dataset: str, root: Path, split: str, context: float, val_fraction: float, seed: int,
            short_side: int, fingerprint: str) -> dict:
    return {"version": CROPS_VERSION, "dataset": dataset, "voc_root": str(root.resolve()), "split": split,
            "context": context, "val_fraction": val_fraction, "seed": seed, "short_side": short_side,
            "split_fingerprint": fingerprint}


def _read_info(out: Path) -> dict | None:
    try:
        return json.loads((out / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def _summary(info: dict, seconds: float | None = None) -> str:
    counts = info["crops"]
    dropped = info.get("dropped_classes") or []
    text = (f"{counts['train']} train + {counts['val']} val crops of {len(info['classes'])} classes from "
            f"{info['images']['train']} + {info['images']['val']} images of {info['params']['dataset']} split "
            f"{info['params']['split']!r} in {info['out']}")
    if dropped:
        text += f"; left out (crops in only one half): {', '.join(dropped)}"
    if seconds is not None:
        text += f"; {seconds:.1f} s"
    return text + "."


def write_crops(out: Path, dataset: str = "voc2007", voc_root: str | Path | None = None, split: str = "train",
                context: float = 0.1, val_fraction: float = 0.2, seed: int = 0, short_side: int = 96) -> str:
    """Write the crop tree of ``split`` under ``out`` (see the module docstring); returns a one-line summary."""
    if not 0.0 <= context <= 1.0:
        raise SppError(f"--context must be in [0, 1], got {context}")
    if not 0.0 < val_fraction < 1.0:
        raise SppError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if short_side < 8:
        raise SppError(f"--short-side must be at least 8 pixels, got {short_side}")
    start = time.perf_counter()
    out = Path(out)
    root = resolve_voc_root(dataset, voc_root)
    voc = VocDataset(root)
    annotations = {a.image_id: a for a in voc.annotations(split)}
    params = _params(dataset, root, split, context, val_fraction, seed, short_side, voc.fingerprint(split))

    info = _read_info(out)
    if info is not None and info.get("params") == params and all((out / h).is_dir() for h in ("train", "val")):
        return "up to date: " + _summary(info)
    if info is None and any((out / h).exists() for h in ("train", "val")):
        raise SppError(f"holds train/ or val/ without {INFO_NAME} (not written by `spp data crops`); refusing to "
                       "overwrite it (choose another --out)", out)

    halves = dict(zip(("train", "val"), divide_images(list(annotations), val_fraction, seed)))
    present = {h: {int(annotations[i].labels[k]) for i in ids for k in _objects(annotations[i])}
               for h, ids in halves.items()}
    kept = sorted(present["train"] & present["val"])
    if not kept:
        raise SppError(f"no class has non-difficult objects in both halves of split {split!r} "
                       f"({len(annotations)} images); use a larger split or another --seed", root)
    dropped = [voc.classes[c] for c in sorted(present["train"] ^ present["val"])]

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".crops-staging-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".crops-staging-{seed}"
    stage.mkdir()
    counts = {"train": 0, "val": 0}
    per_class = {h: {voc.classes[c]: 0 for c in kept} for h in halves}
    try:
        for half, ids in halves.items():
            for label in kept:
                (stage / half / voc.classes[label]).mkdir(parents=True, exist_ok=True)
            for image_id in ids:
                ann = annotations[image_id]
                objects = [k for k in _objects(ann) if int(ann.labels[k]) in kept]
                if not objects:
                    continue
                image = voc.load_image(image_id)
                for k in objects:
                    left, top, right, bottom = crop_box(ann.boxes[k], ann.width, ann.height, context)
                    crop = resize_short_side(image[top:bottom, left:right], short_side)
                    name = voc.classes[int(ann.labels[k])]
                    # Plain writes in the staging folder; the tree is swapped in only when complete.
                    (stage / half / name / f"{image_id}_{k}.jpg").write_bytes(encode_jpeg(crop, JPEG_QUALITY))
                    counts[half] += 1
                    per_class[half][name] += 1
        (out / INFO_NAME).unlink(missing_ok=True)  # not a finished tree while folders are swapped
        for half in halves:
            target = out / half
            if target.exists():
                target.rename(stage / f"old-{half}")
            (stage / half).rename(target)
        info = {"generator": "sppnet.stages.crops", "params": params, "out": str(out),
                "classes": [voc.classes[c] for c in kept], "dropped_classes": dropped,
                "images": {h: len(ids) for h, ids in halves.items()}, "crops": counts, "per_class": per_class,
                "val_images": halves["val"]}
        atomic_write_json(out / INFO_NAME, info)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return "wrote " + _summary(info, time.perf_counter() - start)


__all__ = ["write_crops", "crop_box", "resize_short_side", "divide_images", "INFO_NAME", "MAX_ASPECT"]
