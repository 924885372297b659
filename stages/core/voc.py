"""VOC-layout datasets: split lists, annotations, images, the class list and devkit comp4 detection files.

This is the only place where VOC's 1-based inclusive pixel boxes meet sppnet's 0-based ``[x1, y1, x2, y2)``
float boxes (see ``boxes.py``): ``x1 = xmin - 1, x2 = xmax`` on the way in, the inverse on the way out.

Three dataset kinds (``data.dataset``):

- ``voc2007`` and ``synth``: a VOCdevkit folder that holds ``VOC2007/``. The class list is VOC's 20 classes,
  unless ``VOC2007/classes.txt`` exists (the embedded synthetic dataset writes one); images are ``<id>.jpg``.
- ``voc``: your own VOC-layout folder ``ROOT/{Annotations,JPEGImages,ImageSets/Main}/`` (``--voc-root`` names it,
  or a folder holding exactly one such folder). The classes are those of ``ROOT/classes.txt`` (one a line, in
  that order; blank lines and ``#`` comments ignored), else the sorted names in the annotations of the training
  split. An image is ``JPEGImages/<id>.<ext>`` for any of ``IMAGE_EXTENSIONS`` (any case), or the file the
  annotation's ``<filename>`` names. See docs/own-dataset.md.

Class names name files (``comp4_det_<split>_<class>.txt``, crop folders), so unsafe ones are refused.
XML is parsed with defusedxml (no DTDs, so no entity expansion); image ids and split names that could escape the
folder are refused.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from .config import DATASETS
from .errors import InputError, SppError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # own datasets
CLASSES_FILE = "classes.txt"
BACKGROUND_NAME = "__background__"  # nets.BACKGROUND: class 0 of a fine-tuned fc8, so no dataset class
DEFAULT_VOC_ROOT = Path("data/VOCdevkit")
VOC_ROOT_ENV = "SPP_VOC_ROOT"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SAFE_CLASS = re.compile(r"^\w[\w.\-]*$")  # letters (any script), digits, _ . - : part of a file name
log = logging.getLogger(__name__)
_CLASSES_LOGGED: set[tuple[str, str, tuple[str, ...]]] = set()  # class lists read from annotations, said once


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
    """The folder a named dataset reads, with a helpful error when it is not there: the VOCdevkit folder (holding
    ``VOC2007/``) for ``synth`` and ``voc2007``; the VOC-layout folder itself for ``voc`` (``find_voc_layout``)."""
    if dataset == "voc":
        if not voc_root:
            raise SppError("--dataset voc needs --voc-root DIR: your VOC-layout folder (Annotations/, JPEGImages/, "
                           "ImageSets/Main/) or a folder holding exactly one such folder; see docs/own-dataset.md")
        return find_voc_layout(Path(voc_root))
    if voc_root:
        root = Path(voc_root)
    elif dataset == "synth":
        root = Path("data/synth")
    elif dataset == "voc2007":
        root = Path(os.environ.get(VOC_ROOT_ENV) or DEFAULT_VOC_ROOT)
    else:
        raise SppError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    if not (root / "VOC2007").is_dir():
        if dataset == "synth":
            hint = f"generate it with `spp data synth --out {root}`"
        else:
            hint = (f"put the VOCdevkit folder (holding VOC2007/) at {DEFAULT_VOC_ROOT}, or pass --voc-root DIR, "
                    f"or set {VOC_ROOT_ENV}; get it from http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ "
                    "(VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar)")
            if _layout_parts(root):
                hint = ("this is a VOC-layout folder itself: for your own dataset (your classes, any image "
                        "format) use --dataset voc")
        raise SppError(f"no VOC2007/ folder for dataset {dataset!r}; {hint}", root)
    return root


_LAYOUT_PARTS = ("Annotations", "JPEGImages", "ImageSets/Main")


def _layout_parts(folder: Path) -> list[str]:
    """Which of the VOC layout's folders ``folder`` holds."""
    return [part for part in _LAYOUT_PARTS if (folder / part).is_dir()]


def find_voc_layout(root: str | Path) -> Path:
    """``root`` when it is a VOC-layout folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``), else its
    one subfolder that is (``VOCdevkit/VOC2007``, or any name); a one-line error naming what is missing else."""
    root = Path(root)
    if not root.is_dir():
        raise SppError("no such folder (--voc-root names your VOC-layout dataset folder)", root)
    candidates = [root] if _layout_parts(root) else sorted(
        (sub for sub in root.iterdir() if sub.is_dir() and not sub.name.startswith(".") and _layout_parts(sub)),
        key=lambda p: p.name)
    if not candidates:
        raise SppError("not a VOC-layout dataset: expected Annotations/, JPEGImages/ and ImageSets/Main/ here or in "
                       "exactly one subfolder (see docs/own-dataset.md)", root)
    if len(candidates) > 1:
        raise SppError(f"holds {len(candidates)} VOC-layout folders ({', '.join(p.name + '/' for p in candidates)}); "
                       "pass the one to use as --voc-root", root)
    layout = candidates[0]
    missing = [part + "/" for part in _LAYOUT_PARTS if part not in _layout_parts(layout)]
    if missing:
        raise SppError(f"VOC-layout folder without {', '.join(missing)} (it needs Annotations/, JPEGImages/ and "
                       "ImageSets/Main/)", layout)
    return layout


def read_classes_file(path: str | Path) -> tuple[str, ...]:
    """The classes of a ``classes.txt``: one a line, in order; blank lines and ``#`` comments ignored. Each name is
    checked (``check_class_name``); a duplicate, or a file naming none, is a one-line error with the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text (one class name a line)", path) from None
    seen: dict[str, tuple[str, int]] = {}
    classes = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        check_class_name(name, path, f"line {lineno}: ")
        if name.casefold() in seen:
            first, first_line = seen[name.casefold()]
            what = "is listed twice" if first == name else f"and {first!r} differ only in case"
            raise InputError(f"line {lineno}: class {name!r} {what} (line {first_line}); each class once, "
                             "and names that differ in more than case (they name files)", path)
        seen[name.casefold()] = (name, lineno)
        classes.append(name)
    if not classes:
        raise InputError("lists no classes (one class name a line; blank lines and # comments are ignored)", path)
    return tuple(classes)


def check_class_name(name: str, source: str | Path, where: str = "") -> str:
    """Refuse a class name that cannot be part of a file name (comp4 files and crop folders are named after it)."""
    if name == BACKGROUND_NAME:
        raise InputError(f"{where}class name {name!r} is reserved (the background class of fine-tuning)", source)
    if not _SAFE_CLASS.match(name) or ".." in name:
        raise InputError(f"{where}class name {name!r} is not safe for file names (comp4 files are named after it): "
                         "use letters, digits, '_', '-' and '.', e.g. " + repr(_suggest_name(name)), source)
    return name


def _suggest_name(name: str) -> str:
    suggestion = re.sub(r"[^\w.\-]+", "_", name).strip("_.-").replace("..", ".")
    return suggestion or "my_class"


class VocDataset:
    """A VOC-layout dataset: split lists, annotations (cached), image paths and pixels, the class list.

    ``VocDataset(DEVKIT)`` reads ``DEVKIT/VOC2007/`` as the ``voc2007``/``synth`` kinds always did;
    ``VocDataset(ROOT)`` on a VOC-layout folder itself (or ``kind="voc"``) reads it as your own dataset."""

    def __init__(self, devkit_root: str | Path, year: str = "2007", skip_bad: bool = False, kind: str | None = None,
                 train_split: str = "trainval"):
        path = Path(devkit_root)
        if kind is None:
            kind = "voc2007" if (path / f"VOC{year}").is_dir() or not _layout_parts(path) else "voc"
        if kind not in DATASETS:
            raise SppError(f"unknown dataset {kind!r} (known: {', '.join(DATASETS)})")
        self.kind = kind
        self.own = kind == "voc"  # your own dataset: classes from classes.txt or the annotations, any image format
        self.skip_bad = skip_bad
        self.train_split = train_split
        self._images: dict[str, list[str]] | None = None  # id -> image file names in JPEGImages (own datasets)
        self._annotations: dict[str, Annotation] = {}
        self._classes: tuple[str, ...] | None = None
        self._class_index: dict[str, int] | None = None
        if self.own:
            self.root = find_voc_layout(path)
            self.devkit_root = self.root  # what VocDataset(...) is given to read this dataset again (workers)
        else:
            self.devkit_root = path
            self.root = self.devkit_root / f"VOC{year}"
            if not self.root.is_dir():
                hint = "; for your own VOC-layout folder use --dataset voc" if _layout_parts(path) else ""
                raise SppError(f"no VOC{year}/ folder here (expected a VOCdevkit folder){hint}", self.devkit_root)
        classes_file = self.root / CLASSES_FILE
        if classes_file.exists():
            self._set_classes(read_classes_file(classes_file), CLASSES_FILE)
        elif not self.own:
            self._set_classes(VOC_CLASSES, "VOC")
        else:  # read from the training split's annotations when first needed (``classes``)
            self.classes_source = "annotations"

    @classmethod
    def from_config(cls, data) -> "VocDataset":
        """The dataset a run's ``data`` config section names (``cfg.data``)."""
        return cls(resolve_voc_root(data.dataset, data.voc_root), skip_bad=data.skip_bad, kind=data.dataset,
                   train_split=data.train_split)

    # -- the class list ---------------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        """The object classes, in label order."""
        if self._classes is None:
            self._set_classes(self._classes_from_annotations(), "annotations")
        return self._classes

    @property
    def class_index(self) -> dict[str, int]:
        self.classes  # noqa: B018 - reads them when first needed
        return self._class_index

    def _set_classes(self, classes: tuple[str, ...], source: str) -> None:
        self._classes = tuple(classes)
        self._class_index = {name: i for i, name in enumerate(self._classes)}
        self.classes_source = source  # "classes.txt", "annotations" (of the training split) or "VOC"

    def _classes_from_annotations(self) -> tuple[str, ...]:
        """The sorted object names of the training split's annotations (own datasets without classes.txt)."""
        split = self.train_split
        if not self.split_path(split).exists():
            raise InputError(f"no {CLASSES_FILE} here, and no split list {split!r} (data.train_split) whose "
                             f"annotations would name the classes; write {CLASSES_FILE} (one class name a line)",
                             self.root)
        ids = self.image_ids(split)
        names: set[str] = set()
        for image_id in ids:
            path = self.annotation_path(image_id)
            try:
                found = annotation_class_names(path)
                for name in found:
                    check_class_name(name, path)
            except InputError as err:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping: {err}", stacklevel=3)
                continue
            names.update(found)
        if not names:
            raise InputError(f"no {CLASSES_FILE} here, and the {len(ids)} annotations of split {split!r} name no "
                             f"objects; write {CLASSES_FILE} (one class name a line)", self.root)
        folded: dict[str, str] = {}
        for name in sorted(names):
            if name.casefold() in folded:
                raise InputError(f"the {split!r} annotations name classes {folded[name.casefold()]!r} and {name!r}, "
                                 f"which differ only in case (they name files); rename one, or list the classes in "
                                 f"{CLASSES_FILE}", self.root)
            folded[name.casefold()] = name
        classes = tuple(sorted(names))
        if (str(self.root), split, classes) in _CLASSES_LOGGED:
            return classes
        _CLASSES_LOGGED.add((str(self.root), split, classes))
        log.info("%s: no %s, so the classes are the %d named in the %r annotations: %s", self.root, CLASSES_FILE,
                 len(classes), split, ", ".join(classes))
        return classes

    def _unknown_class_hint(self) -> str:
        if self.classes_source == CLASSES_FILE:
            return f"not in {self.root / CLASSES_FILE}"
        if self.classes_source == "annotations":
            return (f"not among the {len(self.classes)} classes named in the {self.train_split!r} annotations; "
                    f"list every class in {self.root / CLASSES_FILE}")
        return "not one of the 20 VOC classes; for your own classes use --dataset voc"

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
        """``JPEGImages/<id>.jpg``; for your own dataset the one ``JPEGImages/<id>.<ext>`` of any image format
        (else the file the annotation's ``<filename>`` names), with a one-line error for none or two."""
        check_image_id(image_id, self.root)
        folder = self.root / "JPEGImages"
        if not self.own:
            return folder / f"{image_id}.jpg"
        names = self._image_index().get(image_id, [])
        if len(names) == 1:
            return folder / names[0]
        named = annotated_filename(self.annotation_path(image_id))
        if named is not None and (folder / named).is_file() and _is_image_name(named):
            return folder / named
        note = f"; its annotation's <filename> {named!r} is not a file there" if named else ""
        if not names:
            raise InputError(f"no image for id {image_id!r}: looked for {image_id}.<ext> with ext one of "
                             f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)} (any case){note}", folder)
        raise InputError(f"{len(names)} images for id {image_id!r} ({', '.join(names)}): keep one, or name it in "
                         f"the annotation's <filename>{note}", folder)

    def _image_index(self) -> dict[str, list[str]]:
        """Image files of ``JPEGImages/`` by stem (one directory listing, on first use)."""
        if self._images is None:
            index: dict[str, list[str]] = {}
            folder = self.root / "JPEGImages"
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if _is_image_name(entry.name):
                            index.setdefault(os.path.splitext(entry.name)[0], []).append(entry.name)
            except FileNotFoundError:
                raise InputError("no JPEGImages/ folder (a VOC-layout dataset keeps its images there)",
                                 folder) from None
            self._images = {stem: sorted(names) for stem, names in index.items()}
        return self._images

    def annotation(self, image_id: str) -> Annotation:
        cached = self._annotations.get(image_id)
        if cached is None:
            cached = self._annotations[image_id] = read_annotation(self.annotation_path(image_id), self.class_index,
                                                                   image_id=image_id,
                                                                   unknown_hint=self._unknown_class_hint())
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
        if not self.own and not image_path.exists():
            others = sorted(p.name for p in image_path.parent.glob(f"{image_id}.*"))
            if others:
                raise InputError(f"missing image (there is {others[0]}, but the VOC layout names every image "
                                 "<id>.jpg; any format PIL reads may be stored under that name; --dataset voc "
                                 "reads any image format)", image_path)
        image = load_image_rgb(image_path)
        path = self.annotation_path(image_id)
        if path.exists():
            if self._classes is not None:
                ann = self.annotation(image_id)
                width, height = ann.width, ann.height
            else:  # classes still to be read from the annotations (say, in a proposals worker): the size alone
                width, height = read_annotation_size(path)
            if image.shape[:2] != (height, width):
                raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but its annotation says "
                                 f"{width}x{height}", image_path)
        return image

    def fingerprint(self, split: str) -> str:
        """Changes when the split list, the class list or any of the split's annotations change (contents, not
        mtimes); for your own dataset also when an image file is renamed (say ``a.jpg`` -> ``a.png``)."""
        import hashlib
        digest = hashlib.sha256(self.split_path(split).read_bytes())
        digest.update("\n".join(self.classes).encode())
        for image_id in self.image_ids(split):
            path = self.annotation_path(image_id)
            digest.update(path.read_bytes() if path.exists() else b"<missing>")
        if self.own:
            digest.update(b"\0images\0")
            for image_id in self.image_ids(split):
                try:
                    name = self.image_path(image_id).name
                except InputError:
                    name = "<missing>"
                digest.update(f"{name}\n".encode())
        return digest.hexdigest()


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _parse_xml(path: Path) -> ET.Element:
    """The root element of a VOC annotation, parsed safely; a one-line InputError naming the file else."""
    try:
        root = SafeET.parse(path, forbid_dtd=True).getroot()
    except FileNotFoundError:
        raise InputError("missing annotation", path) from None
    except (ET.ParseError, DefusedXmlException) as exc:
        raise InputError(f"malformed XML ({type(exc).__name__}: {exc})", path) from None
    if root.tag != "annotation":
        raise InputError(f"root element is <{root.tag}>, expected <annotation>", path)
    return root


def annotation_class_names(path: Path) -> list[str]:
    """The ``<object><name>`` of one VOC annotation, in file order (no class list needed)."""
    root = _parse_xml(Path(path))
    names = []
    for obj in root.findall("object"):
        name_node = obj.find("name")
        names.append((name_node.text or "").strip() if name_node is not None else "")
    return names


def annotated_filename(path: Path) -> str | None:
    """The plain file name in an annotation's ``<filename>``, or None (no annotation, no such element, not a
    plain name, or an unreadable file: its own error comes when the annotation is read)."""
    try:
        root = _parse_xml(Path(path))
    except InputError:
        return None
    name = (root.findtext("filename") or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        return None
    return name


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


def _annotated_size(root: ET.Element, path: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        raise InputError("missing <size>", path)
    width, height = _int_field(size, "width", path), _int_field(size, "height", path)
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} is not positive", path)
    return width, height


def read_annotation_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of one VOC annotation's ``<size>`` (no class list needed)."""
    return _annotated_size(_parse_xml(Path(path)), Path(path))


def read_annotation(path: Path, class_index: dict[str, int], image_id: str | None = None,
                    unknown_hint: str = "") -> Annotation:
    """Parse one VOC XML safely; a malformed file, unknown class or impossible box is a one-line InputError
    (``unknown_hint``: what an unknown class's error adds in parentheses, e.g. where the class list came from)."""
    path = Path(path)
    root = _parse_xml(path)
    width, height = _annotated_size(root, path)
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        if name not in class_index:
            raise InputError(f"unknown class {name!r}" + (f" ({unknown_hint})" if unknown_hint else ""), path)
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
