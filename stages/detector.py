"""Detect objects in any image with a trained run: the Python API and what ``spp detect --images`` writes.

    >>> from stages.detector import Detector
    >>> detector = Detector.from_run("data/runs/default", feature="ftfc7", one_scale=True, bbox=True)
    >>> found = detector.detect("photo.jpg")            # or a PIL image, or an RGB uint8 array [H, W, 3]
    >>> found.boxes, found.scores, found.names          # float64 [N, 4], float64 [N], class names

The run is loaded once (its saved config, its SVMs or fine-tuned fc8, its box regressors); each image then gets
selective-search proposals and conv5 maps computed on the fly and is scored by ``core.scoring.Scorer``, the same
code as ``spp detect`` on a split. Nothing is written to the run. ``detect_images`` is the ``spp detect --images``
command over this API: it expands files, folders and glob patterns, draws every image, and writes one
``detections.json`` (and, on request, devkit comp4 files).

Boxes follow sppnet's one convention (``core.boxes``), stated in ``BOX_CONVENTION`` and in every
``detections.json``.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .core.artifacts import Run, StageResult, atomic_write_bytes, atomic_write_json
from .core.errors import InputError, SppError
from .core.logs import progress
from .core.nets import resolve_device
from .core.proposals import selective_search
from .core.registry import DEFAULT_RUNS_ROOT, SCORERS
from .core.runner import make_writable_folder
from .core.scoring import LiveMaps, Scorer
from .core.timing import PhaseTimer, no_timer, profile, profile_line
from .core.voc import load_image_rgb, write_comp4

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # folders and globs: these only
BOX_CONVENTION = ("box = [x1, y1, x2, y2], float pixel coordinates in the image as shown (EXIF orientation "
                  "applied), 0-based, origin at the top-left corner of the top-left pixel; x1, y1 inclusive, "
                  "x2, y2 exclusive: a box over pixel columns a..b (0-based, inclusive) has x1 = a, x2 = b + 1, "
                  "width = x2 - x1 (torchvision's convention). comp4 files use VOC's 1-based inclusive "
                  "xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2.")
JSON_FORMAT = "sppnet-detections/1"  # the "format" of detections.json
# What --score-thresh / score_thresh keeps when not given: detections scoring above this. An SVM score's decision
# boundary is 0; fc8's softmax gives probabilities, of which 0.5 is "more likely this class than anything else".
DEFAULT_SCORE_THRESH = {"svm": 0.0, "softmax": 0.5}
_EXIF_ORIENTATION = 0x0112
# Box colours of the drawn images (BGR), one per class index, light enough for black label text.
_PALETTE = ((75, 180, 255), (120, 230, 90), (255, 190, 80), (90, 90, 255), (230, 130, 255), (80, 230, 230),
            (180, 180, 180), (150, 255, 200), (255, 120, 160), (60, 200, 160))


def default_score_thresh(feature: str) -> float:
    """The keep threshold of a scorer when none is given: 0.5 for ``softmax`` probabilities, 0.0 for SVM scores."""
    return DEFAULT_SCORE_THRESH["softmax" if feature == "softmax" else "svm"]


# -- results ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Detections:
    """One image's detections, highest score first. Attributes, or dict-like ``found["boxes"]``:

    ``boxes`` float64 [N, 4] ``[x1, y1, x2, y2]`` (``BOX_CONVENTION``); ``scores`` float64 [N] (SVM scores, or
    softmax probabilities with ``feature="softmax"``); ``labels`` int64 [N], indices into ``classes``; ``names``
    the class name of each detection. ``len(found)`` is N. The arrays are read-only."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    width: int
    height: int
    image: str | None = None  # the path it was read from; None for an array or PIL image

    KEYS: ClassVar[tuple[str, ...]] = ("boxes", "scores", "labels", "names")
    __iter__ = None  # not a sequence of detections nor of keys: use .keys(), the arrays, or to_records()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.classes[k] for k in self.labels)

    def __len__(self) -> int:
        return len(self.scores)

    def keys(self) -> tuple[str, ...]:
        return self.KEYS

    def __getitem__(self, key: str):
        if key not in self.KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def to_records(self) -> list[dict]:
        """``[{"class": name, "score": float, "box": [x1, y1, x2, y2]}, ...]``, as in ``detections.json``."""
        return [{"class": self.classes[int(k)], "score": float(s), "box": [float(v) for v in b]}
                for b, s, k in zip(self.boxes, self.scores, self.labels)]


def _detections(per_class: list[tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...], width: int, height: int,
                image: str | None) -> Detections:
    boxes = np.concatenate([b.reshape(-1, 4) for b, _ in per_class] + [np.zeros((0, 4))]).astype(np.float64)
    scores = np.concatenate([s.reshape(-1) for _, s in per_class] + [np.zeros(0)]).astype(np.float64)
    labels = np.concatenate([np.full(len(s), k, dtype=np.int64) for k, (_, s) in enumerate(per_class)]
                            + [np.zeros(0, dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    arrays = [np.ascontiguousarray(a[order]) for a in (boxes, scores, labels)]
    for array in arrays:
        array.setflags(write=False)
    return Detections(*arrays, classes=classes, width=int(width), height=int(height), image=image)


# -- reading an image -------------------------------------------------------------------------------------------
def read_image(image: Any) -> tuple[np.ndarray, str | None]:
    """(RGB uint8 [H, W, 3], the path or None) of a path, a PIL image or an array. Paths and PIL images are turned
    upright by their EXIF orientation (as image viewers show them); an array is taken as it is (RGB, not BGR)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        pixels = load_image_rgb(path)  # one-line InputError naming the file when it cannot be decoded
        orientation = 1
        try:
            with Image.open(path) as pil:
                orientation = int(pil.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # noqa: BLE001 - decoded above; an unreadable EXIF block just means no rotation
            pass
        return _oriented(pixels, orientation), str(image)
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the image as it is
            upright = image
        if upright.mode.startswith("I;16") or upright.mode == "I":  # as load_image_rgb reads 16-bit grey
            grey = (np.asarray(upright).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), None
        return np.ascontiguousarray(np.asarray(upright.convert("RGB"))), None
    if isinstance(image, np.ndarray):
        pixels = image[:, :, None].repeat(3, axis=2) if image.ndim == 2 else image
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 1:
            raise SppError(f"expected an RGB uint8 array [H, W, 3] (or grey [H, W]), got {image.dtype} "
                           f"{list(image.shape)}")
        return np.ascontiguousarray(pixels), None
    raise SppError(f"cannot detect on a {type(image).__name__}: pass a path, a PIL image or an RGB uint8 array")


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 2-8 the way ``PIL.ImageOps.exif_transpose`` does."""
    if orientation not in range(2, 9):
        return pixels
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}[orientation]
    return np.ascontiguousarray(np.asarray(Image.fromarray(pixels).transpose(method)))


# -- the detector -----------------------------------------------------------------------------------------------
class Detector:
    """A trained run's detector, loaded once: ``detect(image) -> Detections``.

    ``feature``: what scores the windows, an SVM variant (``pool5``, ``fc6``, ``fc7``, ``ftfc6``, ``ftfc7``) or
    ``softmax`` (the fine-tuned fc8, no SVMs); ``one_scale``: conv5 at ``features.one_scale`` only (else every
    scale in ``features.scales``); ``bbox``: apply the box regressors. The variant must have been trained
    (``spp train-svm --feature F [--one-scale]``, ``spp train-bbox [--one-scale]``); if not, the SppError names
    the command. ``score_thresh``: keep detections scoring above it (default ``default_score_thresh(feature)``:
    0.0 for SVM scores, 0.5 for softmax probabilities). Then per-class NMS and ``detect.max_per_image`` as in the
    run's config. ``load_seconds``: how long loading the models took (the profile's "load" phase)."""

    def __init__(self, cfg, *, feature: str = "ftfc7", bbox: bool = True, one_scale: bool = True,
                 device: str | torch.device | None = None, score_thresh: float | None = None):
        if feature not in SCORERS:
            raise SppError(f"unknown feature {feature!r} (known: {', '.join(SCORERS)})")
        started = time.perf_counter()
        self.cfg = cfg
        self.feature, self.one_scale, self.bbox = feature, bool(one_scale), bool(bbox)
        self.device = resolve_device(cfg.device) if device is None else resolve_device(str(device))
        self.score_thresh = default_score_thresh(feature) if score_thresh is None else float(score_thresh)
        self.scorer = Scorer(cfg, Run(cfg.run_dir), feature, self.one_scale, self.bbox, self.device)
        self.backbone = self.scorer.conv_backbone()
        self.load_seconds = time.perf_counter() - started  # the profile's "load" phase (detect_images)

    @classmethod
    def from_run(cls, run: str | os.PathLike, runs_root: str | os.PathLike | None = None, *, feature: str = "ftfc7",
                 bbox: bool = True, one_scale: bool = True, device: str = "auto", score_thresh: float | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Detector:
        """Load the run at ``run`` (a run folder, i.e. one holding ``config.json``) or named ``run`` under
        ``runs_root`` (default ``data/runs``), with the run's saved config; ``overrides`` are dotted config keys
        as ``spp --set`` takes them (e.g. ``{"detect.nms_iou": 0.4}``)."""
        from .core.runconfig import resolve_config

        run_dir = Path(run)
        if runs_root is None and not (run_dir / "config.json").is_file():
            run_dir = Path(DEFAULT_RUNS_ROOT) / run_dir
        elif runs_root is not None:
            run_dir = Path(runs_root) / run_dir
        if not (run_dir / "config.json").is_file():
            raise SppError("not a trained run: no config.json (train one with the spp stages first)", run_dir)
        flat = {"run": run_dir.name, "runs_root": str(run_dir.parent), "device": device, **dict(overrides or {})}
        cfg = resolve_config(None, flat)
        return cls(cfg, feature=feature, bbox=bbox, one_scale=one_scale, score_thresh=score_thresh)

    @property
    def classes(self) -> tuple[str, ...]:
        """The object classes, in ``Detections.labels`` order."""
        return self.scorer.models.classes

    @property
    def scales(self) -> tuple[int, ...]:
        """The shorter sides (px) the conv5 maps are computed at."""
        return self.scorer.scales

    def detect(self, image: Any, *, score_thresh: float | None = None) -> Detections:
        """Detections of one image: a path (str or Path), a PIL image, or an RGB uint8 array [H, W, 3];
        ``score_thresh`` overrides the detector's for this call."""
        pixels, source = read_image(image)
        return self.detect_pixels(pixels, source, score_thresh=score_thresh)

    def detect_many(self, images: Iterable[Any], *, score_thresh: float | None = None) -> list[Detections]:
        """``detect`` on each image in turn (the models stay loaded)."""
        return [self.detect(image, score_thresh=score_thresh) for image in images]

    def detect_pixels(self, pixels: np.ndarray, source: str | None = None, *, score_thresh: float | None = None,
                      timer: PhaseTimer | None = None) -> Detections:
        """Detections of an RGB uint8 array [H, W, 3] taken as it is (``detect`` reads and orients inputs).
        ``timer`` (a ``core.timing.PhaseTimer``) counts where the time goes: "selective_search", "conv", then
        ``Scorer.score``'s phases."""
        phase = timer or no_timer
        pixels, _ = read_image(np.asarray(pixels))  # checks the array's type and shape
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        height, width = pixels.shape[:2]
        with phase("selective_search"):
            # The seed makes selective search's ranking, and so the result, identical for identical pixels.
            windows = selective_search(pixels, self.cfg.proposals, seed=self.cfg.seed)
        with torch.inference_mode():
            with phase("conv"):
                live = LiveMaps(self.backbone, self.scales, pixels, self.device)
                if self.cfg.detect.test_flip:
                    live.maps("image", flip=True)  # the mirrored image's maps, counted as conv too
            per_class = self.scorer.score(live, "image", windows, (width, height), score_thresh=thresh, timer=timer)
        return _detections(per_class, self.classes, width, height, source)

    def describe(self) -> dict:
        """What made the detections: recorded at the top of ``detections.json``."""
        return {"run": str(self.cfg.run_dir), "feature": self.feature, "one_scale": self.one_scale,
                "bbox": self.bbox, "scales": list(self.scales), "score_thresh": self.score_thresh,
                "score": ("fine-tuned fc8 softmax probability" if self.feature == "softmax"
                          else f"linear SVM score on {self.feature} (decision boundary 0)"),
                "test_flip": bool(self.cfg.detect.test_flip), "classes": list(self.classes)}


# -- spp detect --images ----------------------------------------------------------------------------------------
def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def expand_image_paths(inputs: Iterable[str | os.PathLike], skip_outputs_in: str | Path | None = None
                       ) -> list[Path]:
    """Image files, in order, from files (taken whatever their name), folders (their image files, sorted, not
    sub-folders) and glob patterns (``*``, ``?``, ``[..]``, ``**`` for any depth; image files only), each once.
    A missing path, an empty folder or a pattern matching no image is a one-line SppError naming it. Drawn
    outputs (``*_detections.jpg``) found in ``skip_outputs_in`` by a folder or pattern are left out."""
    skip_dir = Path(skip_outputs_in).resolve() if skip_outputs_in is not None else None
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_file():
            candidates, listed = [path], False
        elif path.is_dir():
            candidates = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p)
                                and not p.name.startswith("."))
            listed = True
            if not candidates:
                raise SppError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in this folder", path)
        elif glob.has_magic(text):
            candidates = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                                if os.path.isfile(p) and is_image_name(p))
            listed = True
            if not candidates:
                raise SppError("no image file matches this pattern", text)
        else:
            raise SppError("no such file or folder", path)
        for candidate in candidates:
            if listed and skip_dir is not None and candidate.name.endswith("_detections.jpg") \
                    and candidate.parent.resolve() == skip_dir:
                continue
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    if not found:
        raise SppError("no images to detect on (only earlier outputs of detect --images were found)")
    return found


def output_ids(paths: Sequence[Path]) -> list[str]:
    """One id per image, unique: its file stem (whitespace made ``_``, for comp4 lines), then ``_2``, ``_3``...
    for later images whose stem was taken. Names the drawn image ``<id>_detections.jpg`` and comp4's image id."""
    taken: set[str] = set()
    ids = []
    for path in paths:
        stem = re.sub(r"\s+", "_", path.stem) or "image"
        candidate, n = stem, 2
        while candidate in taken:
            candidate, n = f"{stem}_{n}", n + 1
        taken.add(candidate)
        ids.append(candidate)
    return ids


def draw(pixels: np.ndarray, found: Detections) -> bytes:
    """The image with its detections drawn (lowest score first, so the best is on top), as JPEG bytes."""
    import cv2

    canvas = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    side = min(canvas.shape[:2])
    thickness = max(1, int(np.floor(side / 300 + 0.5)))
    font_scale = max(0.4, side / 900)
    for index in np.argsort(found.scores, kind="stable"):
        x1, y1, x2, y2 = (int(np.floor(v + 0.5)) for v in found.boxes[index])
        label = int(found.labels[index])
        colour = _PALETTE[label % len(_PALETTE)]
        cv2.rectangle(canvas, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        text = f"{found.classes[label]} {found.scores[index]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + base), colour, cv2.FILLED)
        cv2.putText(canvas, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SppError("could not encode the drawn image")
    return encoded.tobytes()


def _bare_message(err: SppError) -> str:
    """The message of ``err`` without the ``<path>: `` prefix."""
    text = str(err)
    prefix = f"{err.path}: " if err.path is not None else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def _log_warning(message: str) -> None:
    log.warning("%s", message)  # the CLI prints it as one `warning: ...` line, above the progress bar if any


def detect_images(detector: Detector, inputs: Sequence[str | os.PathLike], out: str | Path, *,
                  comp4: str | None = None, skip_bad: bool = False,
                  warn: Callable[[str], None] | None = None, started: float | None = None) -> StageResult:
    """``spp detect --images``: every image of ``inputs`` (see ``expand_image_paths``) through ``detector``.

    Writes into ``out``, atomically: ``<id>_detections.jpg`` per image (``output_ids``) and ``detections.json``
    (``{"format", "box_convention", "run", "feature", ..., "complete", "images": [{"image", "id", "drawn",
    "width", "height", "detections": [{"class", "score", "box"}]}], "skipped": [{"image", "error"}],
    "profile"}``); with
    ``comp4=NAME`` also ``comp4_det_NAME_<class>.txt`` per class (devkit format, image ids as above).
    A bad image (unreadable, corrupt, not an image) is skipped with a one-line warning when ``skip_bad``, else
    it stops the run with a one-line InputError naming it; what was drawn before stays, and ``detections.json``
    then lists those images with ``"complete": false``.

    A complete ``detections.json`` also holds ``"profile"`` (``core.timing.profile``): seconds per phase, from
    ``started`` (``time.perf_counter()`` at process start, the CLI's; default: this call, less the detector's
    loading) to the last file written before ``detections.json`` itself."""
    started = time.perf_counter() - detector.load_seconds if started is None else started
    timer = PhaseTimer(detector.device)
    timer.add("load", detector.load_seconds)
    warn = warn or _log_warning
    if comp4 is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", comp4):
        raise SppError(f"the comp4 name must be a plain name such as test, got {comp4!r}")
    out = Path(out)
    paths = expand_image_paths(inputs, skip_outputs_in=out)
    make_writable_folder(out)
    ids = output_ids(paths)
    records: list[dict] = []
    skipped: list[dict] = []
    found_per_image: list[tuple[str, Detections]] = []
    start = time.perf_counter()

    def write_json(complete: bool, prof: dict | None = None) -> None:
        atomic_write_json(out / "detections.json", {
            "format": JSON_FORMAT, "box_convention": BOX_CONVENTION, **detector.describe(), "complete": complete,
            "images": records, "skipped": skipped, **({"profile": prof} if prof is not None else {})})

    def mark_first_image() -> None:
        if "startup" not in timer.seconds:
            timer.add("startup", time.perf_counter() - started - timer.seconds["load"])

    try:
        for path, image_id in progress(list(zip(paths, ids)), desc="detect", unit="img", leave=False):
            mark_first_image()
            try:
                with timer("read"):
                    pixels, _ = read_image(path)
            except InputError as err:
                if not skip_bad:
                    raise InputError(f"{_bare_message(err)} (--skip-bad, or data.skip_bad=true, skips bad images)",
                                     path) from None
                skipped.append({"image": str(path), "error": _bare_message(err)})
                warn(f"{path}: {_bare_message(err)}; skipped")
                continue
            found = detector.detect_pixels(pixels, str(path), timer=timer)
            with timer("write"):
                drawn = f"{image_id}_detections.jpg"
                atomic_write_bytes(out / drawn, draw(pixels, found))
                records.append({"image": str(path), "id": image_id, "drawn": drawn, "width": found.width,
                                "height": found.height, "detections": found.to_records()})
                found_per_image.append((image_id, found))
        mark_first_image()  # when every image was skipped
        if comp4 is not None:
            with timer("write"):
                for k, name in enumerate(detector.classes):
                    write_comp4(out, comp4, name, [(image_id, float(s), b) for image_id, found in found_per_image
                                                   for b, s, label in zip(found.boxes, found.scores, found.labels)
                                                   if label == k])
    except BaseException:
        try:
            write_json(complete=False)  # the images finished so far, marked incomplete
        except (OSError, SppError):
            pass
        raise
    lines = []
    if comp4 is not None:
        lines.append(f"comp4: {out / f'comp4_det_{comp4}_<class>.txt'} for {len(detector.classes)} classes "
                     "(1-based inclusive boxes, image ids as in detections.json)")
    prof = profile(timer, len(records), time.perf_counter() - started)
    write_json(complete=True, prof=prof)  # last, holding the profile: its own writing is not in it
    lines.append(profile_line(prof))
    seconds = time.perf_counter() - start
    count = sum(len(r["detections"]) for r in records)
    bad = f", {len(skipped)} bad image(s) skipped" if skipped else ""
    variant = ", ".join([detector.feature, "1 scale" if detector.one_scale else f"{len(detector.scales)} scales",
                         *(["box regression"] if detector.bbox else []), str(detector.device)])
    summary = (f"{count} detection(s) scoring above {detector.score_thresh:g} on {len(records)} image(s){bad} in "
               f"{seconds:.1f} s ({variant}) -> {out / 'detections.json'}, {out / '<id>_detections.jpg'}")
    return StageResult(None, summary="\n".join([summary, *lines]),
                       extra={"detections": count, "images": len(records), "skipped": len(skipped),
                              "profile": prof})
