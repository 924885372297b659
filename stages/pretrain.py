"""``spp pretrain``: supervised classification pretraining of backbone + SPP + fc6/fc7/fc8 [P §2.4, §3.1].

Reads an ImageFolder tree (``<data>/train/<class>/*`` and ``<data>/val/<class>/*``; default: the synth dataset's
``classification/`` set) and writes ``00_pretrain/model.pt`` (``nets.save_checkpoint``, with the class names,
epochs done and the final val accuracy in its meta) and the stage manifest.

- Multi-size training [P §2.4]: epoch ``e`` trains at ``sizes[e % len(sizes)]`` px (random resized crop, flip);
  the SPP layer makes fc6 independent of the input size. Validation uses the largest size (resize + centre crop).
- SGD with momentum and weight decay; the LR is divided by 10 at each epoch of ``lr_steps`` [P §3.1].
  ``optimizer = "adamw"`` is the option for budgets of a few hundred steps (see ``make_optimizer``).
- Pixels reach the net exactly as the detector feeds it (``nets.preprocess``: BGR - 128 for ZF-5, mean/std for
  torchvision trunks), so the conv layers learned here see the same input statistics at detection time.
- Resumable: ``checkpoint_last.pt`` (model, optimizer, epoch, every rank's RNG states, history) is written
  atomically after every epoch. The data order of an epoch depends only on (seed, epoch), and the RNG streams are
  restored, so an interrupted run resumed on CPU ends with the same weights as an uninterrupted one.
- ``torchrun --nproc-per-node N``: DistributedDataParallel (gloo on CPU, nccl on CUDA) with a DistributedSampler;
  ``batch_size`` is the global batch, split over the ranks; only rank 0 writes files.
- A non-finite loss stops the run with one line naming the epoch and iteration; the last good checkpoint stays.
- ``init``: start from an sppnet checkpoint (its fc8 is replaced when the classes differ) or from a torchvision
  trunk state dict (given to ``nets.build_backbone`` as the weights). ``epochs = 0`` writes those initial weights.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from .core import nets
from .core.artifacts import Run, StageResult, atomic_write_bytes, read_manifest, sha256_file, sha256_json
from .core.config import CHOICES, Config
from .core.errors import InputError, SppError
from .core.runner import Produced, StagePlan, execute
from .core.voc import load_image_rgb, resolve_voc_root

STAGE = "pretrain"
MODEL_FILE = "model.pt"
RESUME_FILE = "checkpoint_last.pt"
RESUME_FORMAT = "sppnet-pretrain-resume/1"
OPTIMIZERS = CHOICES["pretrain.optimizer"]
# fc8 width when there is no classification data to size it (epochs = 0 from an ImageNet trunk): ImageNet's
# 1000 [SPEC §1]. Fine-tuning replaces fc8 anyway.
UNTRAINED_FC8_CLASSES = 1000


# -- distributed context ------------------------------------------------------------------------------------------
@dataclass
class _Ranks:
    """Where this process sits: plain (rank 0 of 1) or one torchrun worker."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this stage created the process group, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    """``cfg.device`` via nets; a torchrun worker takes the GPU of its local rank."""
    device = nets.resolve_device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _join_ranks(preference: str) -> _Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Ranks(device=_pick_device(preference, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def _all_sum(values: list[float], ranks: _Ranks) -> list[float]:
    """Sum small per-rank statistics over all ranks (identity in a plain run)."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# -- data ---------------------------------------------------------------------------------------------------------
def classification_root(cfg: Config) -> Path | None:
    """The ImageFolder tree: ``pretrain.data``, else the synth dataset's ``classification/``; None for others."""
    if cfg.pretrain.data:
        return Path(cfg.pretrain.data)
    if cfg.data.dataset == "synth":
        return resolve_voc_root("synth", cfg.data.voc_root) / "classification"
    return None


def _load_rgb(path: str):
    """ImageFolder loader: one-line InputError naming a corrupt/unreadable file (greys replicated to RGB)."""
    from PIL import Image

    return Image.fromarray(load_image_rgb(Path(path)))


def _image_tree(root: Path, split: str) -> ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"no {split}/ folder: a classification set is an ImageFolder tree "
                         f"{split}/<class>/<image>", root)
    try:
        return ImageFolder(str(folder), loader=_load_rgb)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or a class folder without images
        raise InputError(f"not a usable ImageFolder tree ({' '.join(str(exc).split())})", folder) from None


def _tree_fingerprint(root: Path, trees: dict[str, ImageFolder]) -> str:
    """Changes when a class or an image file is added, removed, renamed or resized (no content hashing, which
    would take minutes on an ImageNet-sized tree)."""
    digest = hashlib.sha256()
    for split, tree in trees.items():
        digest.update(f"{split}\n{chr(10).join(tree.classes)}\n".encode())
        for path, label in tree.samples:
            digest.update(f"{Path(path).relative_to(root)}\t{label}\t{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


class _ToNetInput:
    """PIL RGB image -> the backbone's preprocessed float tensor [3, h, w] (shorter side ``size``), via
    ``nets.preprocess`` so the pixel mode (BGR-128 or ImageNet mean/std) is defined in one place."""

    def __init__(self, size: int, spec: nets.BackboneSpec):
        self.size, self.spec = size, spec

    def __call__(self, image) -> torch.Tensor:
        return nets.preprocess(np.array(image), self.size, self.spec)  # a writable copy for torch


def train_transform(size: int, spec: nets.BackboneSpec, crop_scale: tuple[float, float]) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        transforms.RandomHorizontalFlip(),
        _ToNetInput(size, spec),
    ])


def val_transform(size: int, spec: nets.BackboneSpec) -> transforms.Compose:
    return transforms.Compose([_ToNetInput(size, spec), transforms.CenterCrop(size)])


def epoch_size(sizes: tuple[int, ...], epoch: int) -> int:
    """Multi-size training: whole epochs alternate over the sizes [P §2.4] (``epoch`` 0-based)."""
    return sizes[epoch % len(sizes)]


def epoch_lr(base_lr: float, lr_steps: tuple[int, ...], epoch: int) -> float:
    """Base LR divided by 10 at each step: epochs ``lr_steps[i]`` (0-based) onwards use ``base / 10**(i+1)``."""
    return base_lr * 0.1 ** bisect.bisect_right(sorted(lr_steps), epoch)


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the loader's worker RNGs from (seed, epoch, rank) only, so a resumed epoch draws the same crops."""
    state = np.random.SeedSequence([seed, epoch, rank, 0x5099]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _unwrap_worker_error(err: SppError) -> SppError:
    """A DataLoader worker re-raises our one-line error wrapped in its traceback: keep the original line."""
    text = str(err)
    for marker in ("InputError: ", "SppError: "):
        if "DataLoader worker" in text and marker in text:
            return type(err)(text.rpartition(marker)[2])
    return err


# -- model --------------------------------------------------------------------------------------------------------
def _init_kind(path: Path) -> str:
    """``"checkpoint"`` for an sppnet checkpoint, ``"state_dict"`` for a plain tensor state dict (a trunk)."""
    if not path.is_file():
        raise SppError("no such init weights file", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise SppError(f"not a torch weights file ({nets.load_failure(exc)})", path) from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict"
    if isinstance(obj, dict) and obj.get("format") == nets.CHECKPOINT_FORMAT:
        return "checkpoint"
    raise SppError("neither an sppnet checkpoint nor a tensor state dict", path)


def build_model(cfg: Config, class_names: list[str]) -> tuple[nets.SppNet, dict]:
    """The network to train: from ``pretrain.init`` (an sppnet checkpoint, or a trunk state dict), else fresh
    with the trunk weights of ``model.weights`` (if any). Without ``class_names`` (no data, epochs = 0) the
    classes are the init checkpoint's, or an untrained ImageNet-sized fc8. Returns the model and where its
    weights came from (for the checkpoint meta)."""
    init = Path(cfg.pretrain.init) if cfg.pretrain.init else None
    kind = _init_kind(init) if init else None
    if kind == "checkpoint":
        model, meta = nets.load_checkpoint(init, expect_backbone=cfg.model.backbone)
        for key, have, want in (("pyramid", meta["pyramid"], list(cfg.model.pyramid)),
                                ("fc_dim", meta["fc_dim"], cfg.model.fc_dim),
                                ("width", meta.get("width", 1.0), cfg.model.width)):
            if have != want:
                raise SppError(f"checkpoint has {key} {have}, but the config asks for {want}", init)
        keep_fc8 = not class_names or list(meta["class_names"]) == list(class_names)
        if not keep_fc8:
            model.head.replace_fc8(len(class_names))
            model.class_names = tuple(class_names)
        return model, {"init": str(init), "init_kind": kind, "fc8": "kept" if keep_fc8 else "new"}
    weights = str(init) if kind == "state_dict" else cfg.model.weights
    model = nets.build_sppnet(cfg.model.backbone, weights, cfg.model.pyramid, cfg.model.fc_dim,
                              len(class_names) or UNTRAINED_FC8_CLASSES, cfg.pretrain.dropout, class_names,
                              cfg.model.width)
    return model, {"init": str(init) if init else None, "init_kind": kind or ("weights" if weights else "scratch"),
                   "trunk_weights": weights or None}


def make_optimizer(model: nn.Module, pc) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay [P §3.1], or AdamW: from scratch, ZF-5 (no BatchNorm, raw BGR-128
    pixels) sits on the chance-level plateau for far more SGD steps than a minutes-long CPU budget gives, while
    AdamW's per-weight step sizes leave it within a few hundred steps (measured on the synth set)."""
    if pc.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay)
    if pc.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    raise SppError(f"unknown pretrain.optimizer {pc.optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels)


# -- RNG state (every rank's streams travel in the checkpoint) ----------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _gather_rng_states(ranks: _Ranks) -> list[dict]:
    mine = _rng_state(ranks.device)
    if not ranks.distributed:
        return [mine]
    everyone: list = [None] * ranks.world
    dist.all_gather_object(everyone, mine)
    return everyone


# -- checkpoints --------------------------------------------------------------------------------------------------
def _torch_save_atomic(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_resume(path: Path, resume_key: str, epochs: int) -> dict | None:
    """The last epoch's checkpoint if it belongs to this exact configuration (epochs aside) and is not past the
    requested number of epochs; None to start from scratch."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say so and start over
        tqdm.write(f"pretrain: ignoring unreadable {path} ({type(exc).__name__}); starting from scratch",
                   file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        tqdm.write(f"pretrain: ignoring {path} (not a pretrain checkpoint); starting from scratch", file=sys.stderr)
        return None
    if state.get("resume_key") != resume_key:
        tqdm.write(f"pretrain: {path} was made with another config or data; starting from scratch",
                   file=sys.stderr)
        return None
    if state["epoch"] > epochs:
        tqdm.write(f"pretrain: {path} is at epoch {state['epoch']}, past the requested {epochs}; "
                   "starting from scratch", file=sys.stderr)
        return None
    return state


def _check_finite_weights(model: nn.Module, epoch: int, kept: str) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise SppError(f"non-finite weights ({name}) after epoch {epoch}; {kept}; lower pretrain.lr")


# -- training -----------------------------------------------------------------------------------------------------
def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, ranks: _Ranks,
                 epoch: int, epochs: int, size: int, kept: str) -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over all ranks. Stops on a non-finite loss before stepping."""
    model.train()
    loss_sum = correct = seen = 0.0
    bar = tqdm(loader, desc=f"pretrain epoch {epoch}/{epochs} @{size}px", disable=not ranks.is_main,
               leave=False, dynamic_ncols=True)
    iterator = iter(bar)
    iteration = 0
    while True:
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        except SppError as err:
            raise _unwrap_worker_error(err) from None
        iteration += 1
        images = images.to(ranks.device, memory_format=torch.channels_last, non_blocking=True)
        labels = labels.to(ranks.device, non_blocking=True)
        logits = model(images)
        loss = _classification_loss(logits, labels)
        step = _all_sum([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)], ranks)
        if not np.isfinite(step[0]):
            raise SppError(f"non-finite training loss ({step[0] / step[2]}) at epoch {epoch}, iteration "
                           f"{iteration}/{len(loader)}; {kept}; lower pretrain.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, correct, seen = loss_sum + step[0], correct + step[1], seen + step[2]
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ranks: _Ranks) -> tuple[float, float]:
    """(mean loss, top-1 accuracy) over the whole val set, each rank scoring its own disjoint shard."""
    model.eval()
    loss_sum = correct = seen = 0.0
    try:
        for images, labels in loader:
            images = images.to(ranks.device, memory_format=torch.channels_last)
            labels = labels.to(ranks.device)
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    except SppError as err:
        raise _unwrap_worker_error(err) from None
    loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], ranks)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _loader(dataset, batch_size: int, sampler, workers: int, device: torch.device, generator=None,
            drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, generator=generator)


def run(cfg: Config) -> StageResult:
    """Train (or resume) and write ``model.pt`` + manifest; skipped when already done with this config/data."""
    ranks = _join_ranks(cfg.device)
    try:
        return _run(cfg, ranks)
    finally:
        if ranks.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: Config, ranks: _Ranks) -> StageResult:
    pc = cfg.pretrain
    run_dir = Run(cfg.run_dir)
    out_dir = run_dir.stage_dir(STAGE)
    if pc.epochs > 0 and pc.batch_size < ranks.world:
        raise SppError(f"pretrain.batch_size {pc.batch_size} is smaller than the {ranks.world} torchrun rank(s)")

    # Data: required to train; with epochs = 0 it only names the classes and measures the initial accuracy.
    data_root = classification_root(cfg)
    if data_root is None and pc.epochs > 0:
        raise SppError(f"pretrain on dataset {cfg.data.dataset!r} needs a classification set: pass --data DIR "
                       "(an ImageFolder tree with train/<class>/ and val/<class>/) or set pretrain.data")
    trees: dict[str, ImageFolder] = {}
    if data_root is not None:
        if not data_root.is_dir():
            hint = " (generate it with `spp data synth`)" if cfg.data.dataset == "synth" and not pc.data else ""
            raise InputError(f"no classification set here{hint}", data_root)
        trees = {split: _image_tree(data_root, split) for split in ("train", "val")}
        if trees["train"].classes != trees["val"].classes:
            raise InputError(f"train/ and val/ have different class folders ({trees['train'].classes} vs "
                             f"{trees['val'].classes})", data_root)

    inputs: dict = {}
    if trees:
        inputs["classification_set"] = {"path": str(data_root), "fingerprint": _tree_fingerprint(data_root, trees)}
    for name, value in (("init", pc.init), ("trunk_weights", cfg.model.weights)):
        if value and Path(value).is_file():
            inputs[name] = {"path": value, "sha256": sha256_file(Path(value))}
        elif name == "init" and value:
            raise SppError("no such init weights file", value)
    # pretrain.workers stays in the record: each loader process draws its own augmentation stream
    config = {"pretrain": cfg.section("pretrain"), "model": cfg.section("model"), "seed": cfg.seed}
    plan = StagePlan(STAGE, None, config, inputs, {"model": MODEL_FILE})
    result = execute(run_dir, plan, lambda folder: _train(cfg, ranks, config, inputs, trees, folder),
                     describe=lambda metrics: _summary(metrics, out_dir / MODEL_FILE), cfg=cfg,
                     lock_name=f".lock.rank{ranks.rank}" if ranks.distributed else ".lock")
    if ranks.distributed and not result.skipped:
        dist.barrier()  # rank 0 has written the manifest
    if result.manifest is None:
        manifest = read_manifest(run_dir.manifest_path(STAGE))  # rank 0 prints the summary
        return StageResult(manifest, _summary(manifest.metrics, out_dir / MODEL_FILE))
    return result


def _train(cfg: Config, ranks: _Ranks, config: dict, inputs: dict, trees: dict, out_dir: Path) -> Produced:
    pc = cfg.pretrain
    _seed_all(cfg.seed + ranks.rank)  # model init (rank 0's is broadcast by DDP), dropout, augmentation
    model, origin = build_model(cfg, list(trees["train"].classes) if trees else [])
    class_names = list(model.class_names)
    model.to(ranks.device, memory_format=torch.channels_last)  # ~15% faster convs on CPU (oneDNN) and cuDNN
    spec = model.backbone.spec
    optimizer = make_optimizer(model, pc)

    resume_path = out_dir / RESUME_FILE
    resume_key = sha256_json({"config": {**config, "pretrain": {k: v for k, v in config["pretrain"].items()
                                                                   if k != "epochs"}}, "inputs": inputs})
    state = _load_resume(resume_path, resume_key, pc.epochs)
    start_epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], list(state["history"])
        if len(state["rng"]) == ranks.world:
            _set_rng_state(state["rng"][ranks.rank], ranks.device)
        else:  # another number of ranks than before: fresh per-rank streams, deterministic in (seed, epoch)
            _seed_all(cfg.seed + 1000 * start_epoch + ranks.rank)
        if ranks.is_main:
            tqdm.write(f"pretrain: resuming after epoch {start_epoch} from {resume_path}", file=sys.stderr)
    if ranks.distributed:
        dist.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it

    net: nn.Module = model
    if ranks.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)

    val_loader = None
    if trees:
        val_set = trees["val"]
        val_set.transform = val_transform(max(pc.sizes) if pc.sizes else 224, spec)
        shard = Subset(val_set, range(ranks.rank, len(val_set), ranks.world))
        val_loader = _loader(shard, max(1, pc.batch_size // ranks.world), None, pc.workers, ranks.device,
                             generator=torch.Generator().manual_seed(cfg.seed))
    if trees and pc.epochs > 0:
        train_set = trees["train"]
        per_rank_batch = pc.batch_size // ranks.world
        sampler = DistributedSampler(train_set, num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                     seed=cfg.seed)
        drop_last = len(sampler) >= per_rank_batch  # no ragged last batch (BatchNorm trunks), unless tiny data

    for epoch in range(start_epoch, pc.epochs):
        epoch_started = time.perf_counter()
        size, lr = epoch_size(pc.sizes, epoch), epoch_lr(pc.lr, pc.lr_steps, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_set.transform = train_transform(size, spec, pc.crop_scale)
        sampler.set_epoch(epoch)  # the permutation is a function of (seed, epoch) only
        loader = _loader(train_set, per_rank_batch, sampler, pc.workers, ranks.device,
                         generator=_epoch_generator(cfg.seed, epoch, ranks.rank), drop_last=drop_last)
        kept = (f"the last good checkpoint {resume_path} (epoch {epoch - 1}) is kept" if epoch > 0
                else "no epoch finished, nothing kept")
        train_loss, train_acc = _train_epoch(net, loader, optimizer, ranks, epoch + 1, pc.epochs, size, kept)
        _check_finite_weights(model, epoch + 1, kept)
        val_loss, val_acc = evaluate(net, val_loader, ranks)
        history.append({"epoch": epoch + 1, "size": size, "lr": lr, "train_loss": train_loss,
                        "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                        "seconds": round(time.perf_counter() - epoch_started, 2)})
        rng_states = _gather_rng_states(ranks)
        if ranks.is_main:
            _torch_save_atomic({"format": RESUME_FORMAT, "resume_key": resume_key, "epoch": epoch + 1,
                                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "rng": rng_states, "history": history, "class_names": class_names}, resume_path)
            tqdm.write(f"pretrain epoch {epoch + 1}/{pc.epochs} @{size}px lr {lr:g}: train loss {train_loss:.4f} "
                       f"acc {train_acc:.4f}, val loss {val_loss:.4f} acc {val_acc:.4f} "
                       f"({history[-1]['seconds']:.1f} s)")
            sys.stdout.flush()  # seen at once through a pipe, and never re-flushed by a forked loader worker
        if ranks.distributed:
            dist.barrier()

    val_loss = val_acc = None
    if history:
        val_loss, val_acc = history[-1]["val_loss"], history[-1]["val_accuracy"]
    elif val_loader is not None:  # epochs = 0: report what the initial weights score
        val_loss, val_acc = evaluate(net, val_loader, ranks)
    if not ranks.is_main:
        return Produced({}, write_manifest=False)

    meta = {"class_names": class_names, "epochs": pc.epochs, "val_accuracy": val_acc, "sizes": list(pc.sizes),
            "pixel_mode": spec.pixel_mode, "seed": cfg.seed, **origin}
    model_path = out_dir / MODEL_FILE
    nets.save_checkpoint(model_path, model, meta)
    metrics = {
        "epochs": pc.epochs, "num_classes": len(class_names), "chance_accuracy": 1 / len(class_names)
        if class_names else None, "val_accuracy": val_acc, "val_loss": val_loss,
        "train_images": len(trees["train"]) if trees else 0, "val_images": len(trees["val"]) if trees else 0,
        "val_accuracy_per_epoch": [h["val_accuracy"] for h in history],
        "train_loss_per_epoch": [h["train_loss"] for h in history],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in history],
        "size_per_epoch": [h["size"] for h in history], "lr_per_epoch": [h["lr"] for h in history],
        "seconds_per_epoch": [h["seconds"] for h in history], "world_size": ranks.world,
        "device": str(ranks.device), "weights_from": origin["init_kind"],
    }
    return Produced(metrics)


def _summary(m: dict, model_path: Path) -> str:
    acc = "n/a" if m.get("val_accuracy") is None else f"{m['val_accuracy']:.4f}"
    chance = "" if not m.get("chance_accuracy") else f" (chance {m['chance_accuracy']:.4f})"
    return (f"pretrain: {m.get('epochs')} epoch(s), {m.get('num_classes')} classes, val accuracy {acc}{chance}, "
            f"weights from {m.get('weights_from')} -> {model_path}")
