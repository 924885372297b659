"""VOCdevkit reader/writer: split lists, annotations, images and devkit comp4 detection files.

This is the only place where VOC's 1-based inclusive pixel boxes meet sppnet's 0-based ``[x1, y1, x2, y2)``
float boxes (see ``boxes.py``): ``x1 = xmin - 1, x2 = xmax`` on the way in, the inverse on the way out.

A dataset root is a VOCdevkit folder that holds ``VOC2007/``. The class list is VOC's 20 classes, unless
``VOC2007/classes.txt`` exists (the embedded synthetic dataset writes one).
XML is parsed with defusedxml (no DTDs, so no entity expansion); image ids and split names that could escape the
folder are refused.
"""
from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from .errors import InputError, SppError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DEFAULT_VOC_ROOT = Path("data/VOCdevkit")
VOC_ROOT_ENV = "SPP_VOC_ROOT"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Annotation:
    """One image's ground truth in sppnet's box convention."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # float64 [N, 4], 0-based [x1, y1, x2, y2)
    labels: np.ndarray  # int64 [N], index into the dataset's class list
    difficult: np.ndarray  # bool [N]

    def __len__(self) -> int:
        return len(self.boxes)


def voc_to_boxes(voc_boxes: np.ndarray) -> np.ndarray:
    """1-based inclusive ``[xmin, ymin, xmax, ymax]`` -> 0-based ``[x1, y1, x2, y2)``."""
    out = np.array(voc_boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] -= 1
    return out


def boxes_to_voc(boxes: np.ndarray) -> np.ndarray:
    """0-based ``[x1, y1, x2, y2)`` -> 1-based inclusive ``[xmin, ymin, xmax, ymax]`` (floats, not rounded)."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, :2] += 1
    return out


def check_image_id(image_id: str, source: str | Path) -> str:
    """Refuse ids that could name a file outside the dataset folder (``../x``, ``/etc/passwd``, ``a/b``)."""
    if not _SAFE_ID.match(image_id) or ".." in image_id:
        raise InputError(f"invalid image id {image_id!r} (ids are plain file stems)", source)
    return image_id


def resolve_voc_root(dataset: str, voc_root: str | Path | None) -> Path:
    """The devkit folder for a named dataset, with a helpful error when it is not there."""
    if voc_root:
        root = Path(voc_root)
    elif dataset == "synth":
        root = Path("data/synth")
    elif dataset == "voc2007":
        root = Path(os.environ.get(VOC_ROOT_ENV) or DEFAULT_VOC_ROOT)
    else:
        raise SppError(f"unknown dataset {dataset!r} (known: synth, voc2007)")
    if not (root / "VOC2007").is_dir():
        if dataset == "synth":
            hint = f"generate it with `spp data synth --out {root}`"
        else:
            hint = (f"put the VOCdevkit folder (holding VOC2007/) at {DEFAULT_VOC_ROOT}, or pass --voc-root DIR, "
                    f"or set {VOC_ROOT_ENV}; get it from http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ "
                    "(VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar)")
        raise SppError(f"no VOC2007/ folder for dataset {dataset!r}; {hint}", root)
    return root


class VocDataset:
    """A VOCdevkit ``VOC2007`` folder: split lists, annotations (cached), image paths and pixels."""

    def __init__(self, devkit_root: str | Path, year: str = "2007", skip_bad: bool = False):
        self.devkit_root = Path(devkit_root)
        self.root = self.devkit_root / f"VOC{year}"
        if not self.root.is_dir():
            raise SppError(f"no VOC{year}/ folder here (expected a VOCdevkit folder)", self.devkit_root)
        self.skip_bad = skip_bad
        classes_file = self.root / "classes.txt"
        if classes_file.exists():
            self.classes = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
        else:
            self.classes = VOC_CLASSES
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self._annotations: dict[str, Annotation] = {}

    @classmethod
    def from_config(cls, data) -> "VocDataset":
        """The dataset a run's ``data`` config section names (``cfg.data``)."""
        return cls(resolve_voc_root(data.dataset, data.voc_root), skip_bad=data.skip_bad)

    # -- split lists ----------------------------------------------------------------------------------------
    def split_path(self, split: str) -> Path:
        folder = self.root / "ImageSets" / "Main"
        if not _SAFE_ID.match(split) or ".." in split:  # a split name, like an image id, is a plain file stem
            raise InputError(f"invalid split name {split!r} (splits are file stems in ImageSets/Main)", folder)
        return folder / f"{split}.txt"

    def image_ids(self, split: str) -> list[str]:
        path = self.split_path(split)
        try:
            lines = path.read_text().split("\n")
        except FileNotFoundError:
            have = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
            raise InputError(f"no split list {split!r} (splits here: {', '.join(have) or 'none'})", path) from None
        ids = [check_image_id(line.split()[0], path) for line in lines if line.strip()]
        if not ids:
            raise InputError(f"split {split!r} lists no images", path)
        if len(set(ids)) != len(ids):
            raise InputError(f"split {split!r} lists an image twice", path)
        return ids

    # -- annotations ----------------------------------------------------------------------------------------
    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{check_image_id(image_id, self.root)}.xml"

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{check_image_id(image_id, self.root)}.jpg"

    def annotation(self, image_id: str) -> Annotation:
        cached = self._annotations.get(image_id)
        if cached is None:
            cached = self._annotations[image_id] = read_annotation(self.annotation_path(image_id), self.class_index,
                                                                   image_id=image_id)
        return cached

    def annotations(self, split: str) -> list[Annotation]:
        """Every annotation of a split; with ``skip_bad``, a bad one is warned about and left out."""
        out = []
        for image_id in self.image_ids(split):
            try:
                out.append(self.annotation(image_id))
            except InputError as err:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping: {err}", stacklevel=2)
        return out

    def usable_ids(self, split: str) -> list[str]:
        return [a.image_id for a in self.annotations(split)]

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB uint8 [H, W, 3]; checks that the pixels match the annotated size."""
        image_path = self.image_path(image_id)
        if not image_path.exists():
            others = sorted(p.name for p in image_path.parent.glob(f"{image_id}.*"))
            if others:
                raise InputError(f"missing image (there is {others[0]}, but the VOC layout names every image "
                                 "<id>.jpg; any format PIL reads may be stored under that name)", image_path)
        image = load_image_rgb(image_path)
        path = self.annotation_path(image_id)
        if path.exists():
            ann = self.annotation(image_id)
            if image.shape[:2] != (ann.height, ann.width):
                raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but its annotation says "
                                 f"{ann.width}x{ann.height}", self.image_path(image_id))
        return image

    def fingerprint(self, split: str) -> str:
        """Changes when the split list or any of its annotations change (contents, not mtimes)."""
        import hashlib
        digest = hashlib.sha256(self.split_path(split).read_bytes())
        digest.update("\n".join(self.classes).encode())
        for image_id in self.image_ids(split):
            path = self.annotation_path(image_id)
            digest.update(path.read_bytes() if path.exists() else b"<missing>")
        return digest.hexdigest()


def encode_jpeg(image_rgb: np.ndarray, quality: int = 90) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes (OpenCV), for the datasets sppnet writes itself."""
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise SppError("OpenCV could not encode a JPEG")
    return data.tobytes()


def load_image_rgb(path: Path) -> np.ndarray:
    """Decode any image OpenCV reads (JPEG, PNG, grey, CMYK JPEG) as RGB uint8 [H, W, 3]; one-line error else."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise InputError("missing image", path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise InputError("empty image file", path)
    # PIL handles truncated JPEGs by raising, where OpenCV may silently return a grey-padded image.
    try:
        from PIL import Image
        with Image.open(path) as pil:
            pil.load()
            if pil.mode.startswith("I;16") or pil.mode == "I":  # 16-bit grey: PIL's convert("RGB") would clip
                grey = (np.asarray(pil).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                image = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                image = np.asarray(pil.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if decoded is None:
            raise InputError(f"corrupt or unsupported image ({type(exc).__name__}: {exc})", path) from None
        raise InputError(f"corrupt or truncated image ({exc})", path) from None
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"unexpected image shape {image.shape}", path)
    return np.ascontiguousarray(image)


def _int_field(node: ET.Element, tag: str, path: Path) -> int:
    child = node.find(tag)
    if child is None or child.text is None:
        raise InputError(f"missing <{tag}>", path)
    try:
        return int(round(float(child.text.strip())))
    except ValueError:
        raise InputError(f"<{tag}> is not a number: {child.text.strip()!r}", path) from None


def read_annotation(path: Path, class_index: dict[str, int], image_id: str | None = None) -> Annotation:
    """Parse one VOC XML safely; a malformed file, unknown class or impossible box is a one-line InputError."""
    path = Path(path)
    try:
        root = SafeET.parse(path, forbid_dtd=True).getroot()
    except FileNotFoundError:
        raise InputError("missing annotation", path) from None
    except (ET.ParseError, DefusedXmlException) as exc:
        raise InputError(f"malformed XML ({type(exc).__name__}: {exc})", path) from None
    if root.tag != "annotation":
        raise InputError(f"root element is <{root.tag}>, expected <annotation>", path)
    size = root.find("size")
    if size is None:
        raise InputError("missing <size>", path)
    width, height = _int_field(size, "width", path), _int_field(size, "height", path)
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} is not positive", path)
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        if name not in class_index:
            raise InputError(f"unknown class {name!r}", path)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise InputError(f"object {name!r} has no <bndbox>", path)
        xmin, ymin, xmax, ymax = (_int_field(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise InputError(f"box ({xmin},{ymin},{xmax},{ymax}) of {name!r} has max < min", path)
        if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            raise InputError(f"box ({xmin},{ymin},{xmax},{ymax}) of {name!r} lies outside the "
                             f"{width}x{height} image", path)
        diff_node = obj.find("difficult")
        boxes.append((xmin, ymin, xmax, ymax))
        labels.append(class_index[name])
        difficult.append(diff_node is not None and (diff_node.text or "0").strip() == "1")
    return Annotation(
        image_id=image_id or path.stem,
        width=width,
        height=height,
        boxes=voc_to_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 4)),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.array(difficult, dtype=bool),
    )


def annotation_xml(ann: Annotation, classes: tuple[str, ...], filename: str | None = None) -> bytes:
    """VOC XML for an annotation (boxes rounded to the devkit's integer inclusive pixels)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = filename or f"{ann.image_id}.jpg"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(ann.width)
    ET.SubElement(size, "height").text = str(ann.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for box, label, diff in zip(boxes_to_voc(ann.boxes), ann.labels, ann.difficult):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if diff else "0"
        bnd = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bnd, tag).text = str(int(np.floor(value + 0.5)))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8")


# -- devkit comp4 detection files -------------------------------------------------------------------------------
def comp4_path(folder: Path, split: str, class_name: str) -> Path:
    return Path(folder) / f"comp4_det_{split}_{class_name}.txt"


def write_comp4(folder: Path, split: str, class_name: str,
                detections: list[tuple[str, float, np.ndarray]]) -> Path:
    """Write ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` lines (1-based inclusive, devkit format)."""
    from .artifacts import atomic_write_bytes

    lines = []
    for image_id, score, box in detections:
        xmin, ymin, xmax, ymax = boxes_to_voc(box)[0]
        lines.append(f"{image_id} {score:.6f} {xmin:.1f} {ymin:.1f} {xmax:.1f} {ymax:.1f}\n")
    path = comp4_path(folder, split, class_name)
    atomic_write_bytes(path, "".join(lines).encode())
    return path


@dataclass(frozen=True)
class Detections:
    """One class's detections: parallel arrays, boxes in sppnet's convention."""

    image_ids: list[str]
    scores: np.ndarray  # float64 [N]
    boxes: np.ndarray  # float64 [N, 4]


def read_comp4(path: Path) -> Detections:
    """Read a comp4 file; a missing file is no detections; a malformed line is a one-line error with its number."""
    path = Path(path)
    ids, rows = [], []
    if path.exists():
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise InputError(f"line {lineno}: expected '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                                 f"got {len(parts)} fields", path)
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise InputError(f"line {lineno}: score and box must be numbers", path) from None
            if not all(np.isfinite(values)):
                raise InputError(f"line {lineno}: non-finite number", path)
            ids.append(check_image_id(parts[0], path))
            rows.append(values)
    array = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return Detections(image_ids=ids, scores=array[:, 0], boxes=voc_to_boxes(array[:, 1:]))
