"""The run's typed, frozen configuration.

Defaults live here with a reason each; a preset TOML file (``configs/*.toml``) overrides them, then command-line
options override that. Unknown keys and wrong types are errors. The resolved config is saved in the run directory.
Defaults follow the released SPP_net code where it differs from the paper (SPEC.md §9), unless noted.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SppError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def _require_choices(section: Any, name: str) -> None:
    for key, known in CHOICES.items():
        prefix, _, leaf = key.partition(".")
        if prefix == name and getattr(section, leaf) not in known:
            raise SppError(f"config {key}: {getattr(section, leaf)!r} is not one of {', '.join(known)}")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    """A range or cross-field check of the config types: one line naming the key, run whenever a value is set."""
    if not ok:
        shown = list(value) if isinstance(value, tuple) else value
        raise SppError(f"config {key}: {shown!r} {what}")



# data.dataset: "synth" (the embedded generated set), "voc2007" (PASCAL VOC 2007, its 20 classes), "voc" (your own
# VOC-layout folder, your classes; docs/own-dataset.md).
DATASETS: tuple[str, ...] = ("synth", "voc2007", "voc")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synth"  # one of DATASETS
    # synth / voc2007: the folder holding VOC2007/; empty -> data/synth (synth) or $SPP_VOC_ROOT or data/VOCdevkit.
    # voc: the VOC-layout folder (Annotations/, JPEGImages/, ImageSets/Main/) or a folder holding exactly one.
    voc_root: str = ""
    train_split: str = "trainval"  # what finetune / train-svm / train-bbox learn from (and voc's classes, when
    # it has no classes.txt)
    test_split: str = "test"  # what detect / eval score by default
    skip_bad: bool = False  # warn and skip a bad image/annotation instead of stopping

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, "data.dataset", self.dataset, f"is not one of {', '.join(DATASETS)}")



@dataclass(frozen=True)
class ProposalConfig:
    ks: tuple[int, ...] = (50, 100)  # graph-segmentation k (= minSize) of SS fast mode [SPEC §3]
    sigma: float = 0.8
    min_side: int = 20  # drop boxes narrower than this many pixels [SPEC §3]
    # "width": SPEC §3's "narrower" (VOC07 val recall@0.5 0.907 uncapped); "both": height too, as R-CNN's
    # FilterBoxesWidth does (0.889 uncapped)
    min_side_applies_to: str = "width"
    max_boxes: int = 0  # keep at most this many per image, in rank order; 0 = all, as the released code
    max_image_side: int = 500  # SS runs on an image resized to this longest side (boxes mapped back); 0 = off
    workers: int = 0  # processes; 0 = all cores

    def __post_init__(self) -> None:
        _require_choices(self, "proposals")
        _require(bool(self.ks) and min(self.ks) >= 1, "proposals.ks", self.ks, "must be positive integers")
        _require(self.sigma > 0, "proposals.sigma", self.sigma, "must be positive")
        _require(self.min_side >= 0, "proposals.min_side", self.min_side, "must be >= 0")
        _require(self.max_boxes >= 0, "proposals.max_boxes", self.max_boxes, "must be >= 0 (0: all)")
        _require(self.max_image_side >= 0, "proposals.max_image_side", self.max_image_side, "must be >= 0 (0: off)")
        _require(self.workers >= 0, "proposals.workers", self.workers, "must be >= 0 (0: all cores)")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "zf5"  # one of CHOICES["model.backbone"] (stages/core/nets.py's table), all at stride 16
    weights: str = ""  # local state-dict file for the torchvision trunk, or torchvision's named weights
    pyramid: tuple[int, ...] = (1, 2, 3, 6)  # SPP levels, concatenated in this order [SPEC §1]
    fc_dim: int = 4096  # fc6/fc7 width [SPEC §1]
    dropout: float = 0.5  # fc6/fc7 dropout while fine-tuning [SPEC §4] (pretraining has its own)
    width: float = 1.0  # ZF-5 channels x this (1.0: the paper's 96-256-384-384-256)

    def __post_init__(self) -> None:
        _require(bool(self.pyramid) and min(self.pyramid) >= 1 and len(set(self.pyramid)) == len(self.pyramid),
                 "model.pyramid", self.pyramid, "must be distinct positive bin counts")
        _require(self.fc_dim >= 1, "model.fc_dim", self.fc_dim, "must be positive")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _require_choices(self, "model")
        _require(0.0 < self.width <= 4.0, "model.width", self.width, "must be in (0, 4]")
        _require(self.width == 1.0 or self.backbone == "zf5", "model.width", self.width,
                 f"applies to zf5 only (a {self.backbone} trunk keeps its pretrained channels)")


@dataclass(frozen=True)
class PretrainConfig:
    data: str = ""  # ImageFolder tree; empty -> the embedded classification set of the synth dataset
    sizes: tuple[int, ...] = (180, 224)  # multi-size training, alternating per epoch [P §2.4]
    epochs: int = 70  # ImageNet schedule [P §3.1]
    batch_size: int = 128
    lr: float = 0.01  # divided by 10 at each of lr_steps [P §3.1]
    lr_steps: tuple[int, ...] = (30, 55)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    workers: int = 2
    init: str = ""  # start from this local weights file instead of scratch
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (torchvision's ImageNet default)
    optimizer: str = "sgd"  # "sgd" (paper: momentum + weight decay) | "adamw" (for budgets too short for SGD)
    dropout: float = 0.5  # fc6/fc7 dropout while pretraining [P §3.1]

    def __post_init__(self) -> None:
        _require_choices(self, "pretrain")
        _require(bool(self.sizes) and min(self.sizes) >= 1, "pretrain.sizes", self.sizes, "must be positive")
        _require(self.epochs >= 0, "pretrain.epochs", self.epochs, "must be >= 0")
        _require(self.batch_size >= 1, "pretrain.batch_size", self.batch_size, "must be positive")
        _require(self.lr > 0, "pretrain.lr", self.lr, "must be positive")
        _require(list(self.lr_steps) == sorted(self.lr_steps) and all(s >= 0 for s in self.lr_steps),
                 "pretrain.lr_steps", self.lr_steps, "must be ascending epochs")
        _require(self.momentum >= 0 and self.weight_decay >= 0, "pretrain.momentum/weight_decay",
                 (self.momentum, self.weight_decay), "must be >= 0")
        _require(self.workers >= 0, "pretrain.workers", self.workers, "must be >= 0")
        _require(0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0, "pretrain.crop_scale", self.crop_scale,
                 "must be an interval in (0, 1]")
        _require(0.0 <= self.dropout < 1.0, "pretrain.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class FeatureConfig:
    scales: tuple[int, ...] = (480, 576, 688, 874, 1200)  # shorter sides; code's 874, paper's 864 [SPEC §2]
    one_scale: int = 688  # the 1-scale setting [P §4.1]
    scale_rule: str = "code"  # "code": 208-px side, linear distance; "paper": area closest to 224x224 [SPEC §2]
    batch_images: int = 1  # images per conv forward (same-size batches only)
    compression: int = 4  # gzip level for the float16 HDF5 maps
    flip: bool = True  # also cache maps of the flipped image (train split): fine-tuning trains on flips [SPEC §3]

    def __post_init__(self) -> None:
        _require_choices(self, "features")
        _require(bool(self.scales) and min(self.scales) >= 1 and len(set(self.scales)) == len(self.scales),
                 "features.scales", self.scales, "must be distinct positive shorter sides")
        _require(self.one_scale >= 1, "features.one_scale", self.one_scale, "must be a positive shorter side")
        _require(self.batch_images >= 1, "features.batch_images", self.batch_images, "must be positive")
        _require(0 <= self.compression <= 9, "features.compression", self.compression, "must be a gzip level 0-9")


@dataclass(frozen=True)
class FinetuneConfig:
    iters: int = 90000  # released code: 30k at each of 1e-3, 1e-4, 1e-5 [SPEC §4]
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (30000, 60000)  # x0.1 at each
    batch_size: int = 128  # 32 foreground + 96 background [SPEC §4]
    fg_fraction: float = 0.25
    fg_iou: float = 0.5  # foreground: max IoU >= 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)  # background: max IoU in [0.1, 0.5)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    holdout_fraction: float = 0.1  # of training images, for snapshot selection (never the test split)
    train_images: int = 0  # learn from a seeded subset of this many of the other images (0: all; learning curves)
    eval_every: int = 2000
    flip: bool = True
    conv: bool = False  # also fine-tune the conv layers through SPP (beyond the paper)
    conv_lr_factor: float = 0.1  # --conv: conv-layer LR = lr * this (pretrained trunk)
    conv_images: int = 2  # --conv: images per mini-batch (as Fast R-CNN), each at one random scale
    # --conv: the trunk's first N body layers stay frozen (Fast R-CNN keeps VGG16's conv1-conv2); their output is
    # computed once per image, flip and scale and kept in memory (conv_memo_mb) instead of every step.
    conv_frozen_layers: int = 0
    conv_memo_mb: int = 2048
    holdout_batches: int = 500  # fixed held-out batches per evaluation (released code: test_iter 500)
    pool_memory_mb: int = 2048  # float16 pooled training windows held at once (released: 500-iteration chunks)
    checkpoint_every_s: float = 600.0  # write a resume point at most this often (0: at every chunk end)

    def __post_init__(self) -> None:
        for key in ("iters", "batch_size", "eval_every", "conv_images", "pool_memory_mb"):
            _require(getattr(self, key) >= 1, f"finetune.{key}", getattr(self, key), "must be positive")
        _require(self.holdout_batches >= 0, "finetune.holdout_batches", self.holdout_batches, "must be >= 0")
        _require(self.train_images >= 0, "finetune.train_images", self.train_images, "must be >= 0 (0: all)")
        _require(self.lr > 0, "finetune.lr", self.lr, "must be positive")
        _require(list(self.lr_steps) == sorted(self.lr_steps) and all(s >= 0 for s in self.lr_steps),
                 "finetune.lr_steps", self.lr_steps, "must be ascending iterations")
        _require(0.0 <= self.fg_fraction <= 1.0, "finetune.fg_fraction", self.fg_fraction, "must be in [0, 1]")
        _require(0.0 <= self.bg_iou[0] <= self.bg_iou[1] <= self.fg_iou <= 1.0, "finetune.bg_iou", self.bg_iou,
                 f"must be an interval below fg_iou {self.fg_iou}")
        _require(self.momentum >= 0 and self.weight_decay >= 0, "finetune.momentum/weight_decay",
                 (self.momentum, self.weight_decay), "must be >= 0")
        _require(0.0 <= self.holdout_fraction < 1.0, "finetune.holdout_fraction", self.holdout_fraction,
                 "must be in [0, 1)")
        _require(self.conv_lr_factor >= 0, "finetune.conv_lr_factor", self.conv_lr_factor, "must be >= 0")
        _require(self.conv_frozen_layers >= 0, "finetune.conv_frozen_layers", self.conv_frozen_layers,
                 "must be >= 0 (0: every conv layer trains)")
        _require(self.conv_memo_mb >= 0, "finetune.conv_memo_mb", self.conv_memo_mb, "must be >= 0 (0: no memo)")
        _require(self.checkpoint_every_s >= 0, "finetune.checkpoint_every_s", self.checkpoint_every_s, "must be >= 0")


@dataclass(frozen=True)
class SvmConfig:
    C: float = 1e-3  # liblinear -c [SPEC §5]
    pos_weight: float = 2.0  # -w1 2
    bias_multiplier: float = 10.0  # -B 10
    neg_iou: float = 0.3  # negatives: IoU < 0.3 with every GT of the class
    target_norm: float = 20.0  # features scaled to this mean L2 norm
    hard_thresh: float = -1.0001  # mine negatives scoring above this
    evict_thresh: float = -1.2  # drop cached negatives scoring below this after a retrain
    retrain_every: int = 2000  # new negatives between retrains
    pruning: str = "dedup"  # "dedup" (code: one per conv5 rect+scale) | "overlap70" (paper) | "none"
    workers: int = 0  # classes trained in parallel; 0 = all cores
    tol: float = 1e-4  # liblinear dual stopping tolerance (sklearn's default; liblinear's own 0.1 stops early)
    max_iter: int = 20000  # liblinear dual passes; a fit reaching it is reported as not converged
    # "liblinear" (scikit-learn's, as the released code: it copies each training set into float64 and its own
    # 16-byte nodes) | "dense" (core/dense_svm.py: the same solver on the cached float32 rows in place, no copies)
    solver: str = "liblinear"
    # GiB bound on the hard-negative cache (float32 features, each window once): past it the easiest negatives are
    # evicted (metrics: cache_evicted_for_memory). Each fit, and the fits running at once, are also kept within it,
    # by their estimated memory (a class whose fit would pass it is fitted on its hardest negatives that fit), so
    # the stage's peak is about twice this plus the positives. The
    # embedded dataset never comes near it: there the results are those of unbounded mining.
    max_cache_gb: float = 8.0

    def __post_init__(self) -> None:
        _require_choices(self, "svm")
        for key in ("C", "pos_weight", "bias_multiplier", "target_norm", "tol", "max_cache_gb"):
            _require(getattr(self, key) > 0, f"svm.{key}", getattr(self, key), "must be positive")
        _require(0.0 < self.neg_iou <= 1.0, "svm.neg_iou", self.neg_iou, "must be in (0, 1]")
        _require(self.evict_thresh <= self.hard_thresh, "svm.evict_thresh", self.evict_thresh,
                 f"must not exceed svm.hard_thresh {self.hard_thresh}")
        _require(self.retrain_every >= 1 and self.max_iter >= 1, "svm.retrain_every/max_iter",
                 (self.retrain_every, self.max_iter), "must be positive")
        _require(self.workers >= 0, "svm.workers", self.workers, "must be >= 0 (0: all cores)")


@dataclass(frozen=True)
class BboxConfig:
    lam: float = 4000.0  # ridge lambda (SPP code) [SPEC §6]
    min_iou: float = 0.5  # training windows with IoU > this
    target_norm: float = 20.0

    def __post_init__(self) -> None:
        _require(self.lam > 0, "bbox.lam", self.lam, "must be positive")
        _require(0.0 <= self.min_iou < 1.0, "bbox.min_iou", self.min_iou, "must be in [0, 1)")
        _require(self.target_norm > 0, "bbox.target_norm", self.target_norm, "must be positive")


@dataclass(frozen=True)
class DetectConfig:
    score_thresh: float = -1.5  # keep scores above this [SPEC §7]
    nms_iou: float = 0.3
    max_per_image: int = 100
    bbox: bool = True  # apply box regression when a regressor exists
    batch_windows: int = 4096  # windows per fc batch
    fc_dtype: str = "float32"  # "bfloat16": fc6/fc7 in bfloat16, ~2x faster with AVX512-BF16/AMX or a GPU (opt-in)
    # Less fc6/fc7 work, shared by train-svm, detect and bench (opt-in; core/fccompress.py): "svd" (Fast R-CNN's
    # truncated SVD, SPEC §10), "int8" (dynamic int8 layers, CPU only, float32 input), "none" (exact).
    fc_compression: str = "none"
    # (fc6, fc7) ranks kept by "svd" (Fast R-CNN's for VGG16); a rank >= min(in, out) keeps that layer whole, and
    # a rank saves work only below in * out / (in + out)
    fc_svd_ranks: tuple[int, int] = (1024, 256)
    # Beyond the paper (opt-in): also score every window on the mirrored image's conv5 maps and average the two
    # scores, as the network saw mirrored images in fine-tuning. Costs a second pool + fc pass per image, and
    # extract-features then stores mirrored maps of the test split too. Box regression reads the image as it is.
    test_flip: bool = False

    def __post_init__(self) -> None:
        _require_choices(self, "detect")
        _require(0.0 < self.nms_iou <= 1.0, "detect.nms_iou", self.nms_iou, "must be in (0, 1]")
        _require(self.max_per_image >= 1, "detect.max_per_image", self.max_per_image, "must be positive")
        _require(self.batch_windows >= 1, "detect.batch_windows", self.batch_windows, "must be positive")
        _require(min(self.fc_svd_ranks) >= 1, "detect.fc_svd_ranks", self.fc_svd_ranks,
                 "must be positive ranks (fc6, fc7)")
        _require(not (self.fc_compression == "int8" and self.fc_dtype != "float32"), "detect.fc_compression",
                 self.fc_compression, f"takes float32 input, not detect.fc_dtype {self.fc_dtype!r}")


@dataclass(frozen=True)
class Config:
    run: str = "default"  # run name: data/runs/<run>
    runs_root: str = "data/runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SvmConfig = field(default_factory=SvmConfig)
    bbox: BboxConfig = field(default_factory=BboxConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def experiment_dict(self) -> dict:
        """``to_dict`` without the machine settings: what a run's ``config.json`` holds."""
        return drop_machine_keys(self.to_dict())

    def section(self, name: str) -> dict:
        return self.to_dict()[name]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a TOML or CLI value to the field's declared type; raise SppError on mismatch."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"tuple": tuple})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise SppError(f"config {where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise SppError(f"config {where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise SppError(f"config {where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SppError(f"config {where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SppError(f"config {where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise SppError(f"config {where}: expected a string, got {value!r}")
    if isinstance(annotation, types.UnionType):
        raise SppError(f"config {where}: unsupported union type")
    raise SppError(f"config {where}: unsupported type {annotation!r}")


# Keys that take one of a few words: checked by the config types whenever one is made (``_require_choices``), so
# a typo in a preset or a --set fails at once with the known words and never reaches a run's saved config.json.
CHOICES: dict[str, tuple[str, ...]] = {
    "features.scale_rule": ("code", "paper"),
    # nets.BACKBONES (a test keeps the two equal; nets imports torch, the config must not)
    "model.backbone": ("zf5", "mobilenet_v2", "mobilenet_v2_c17", "mobilenet_v2_c18", "mobilenet_v2_c19", "alexnet",
                       "vgg16", "resnet18", "resnet50"),
    "proposals.min_side_applies_to": ("both", "width"),
    "pretrain.optimizer": ("sgd", "adamw"),
    "svm.pruning": ("dedup", "overlap70", "none"),
    "svm.solver": ("liblinear", "dense"),
    "detect.fc_dtype": ("float32", "bfloat16"),
    "detect.fc_compression": ("none", "svd", "int8"),
}


# Machine settings change how fast a stage runs, never what it computes: they are not experiment parameters, so
# they are never saved in a run's config.json (each command takes them from its own options or the defaults).
# (pretrain.workers is not one: each data-loader process draws its own augmentation stream.)
MACHINE_KEYS: tuple[str, ...] = ("device", "proposals.workers", "svm.workers")


def drop_machine_keys(nested: dict) -> dict:
    """A copy of a nested config dict without ``MACHINE_KEYS``."""
    out = json.loads(json.dumps(nested))
    for key in MACHINE_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def merge(cfg: Any, overrides: dict, where: str = "") -> Any:
    """A copy of the frozen dataclass ``cfg`` with ``overrides`` (nested dicts) applied; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise SppError(f"unknown config key {path!r} (known: {', '.join(sorted(fields))})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SppError(f"config {path}: expected a table, got {value!r}")
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(value, fields[key].type, path)  # the types' __post_init__ checks the values
    return dataclasses.replace(cfg, **changes)


def load_preset(name_or_path: str) -> dict:
    """A preset by name (``configs/<name>.toml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise SppError(f"no such config preset (known presets: {known})", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise SppError(f"invalid TOML ({exc})", path) from None


def build_config(preset: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- preset file <- overrides (dotted keys like ``{"features.scales": [688]}`` or nested dicts)."""
    cfg = Config()
    if preset:
        cfg = merge(cfg, load_preset(preset))
    if overrides:
        cfg = merge(cfg, _nest(overrides))
    return cfg


def _nest(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def config_from_run(run_dir: Path) -> Config:
    """The resolved config saved in a run directory; machine settings take their defaults (an older run may
    have saved them: they are dropped, so a ``--device cuda`` saved once does not stick)."""
    path = Path(run_dir) / "config.json"
    try:
        return merge(Config(), drop_machine_keys(json.loads(path.read_text())))
    except FileNotFoundError:
        raise SppError("no config.json: not a run directory", path) from None
    except (OSError, ValueError) as exc:
        raise SppError(f"unreadable run config ({exc})", path) from None
