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

The code: this package's ``__init__`` is the stage (its plan, ``run`` and the epoch loop that writes the model);
``data.py`` holds the ImageFolder set, its transforms and loaders; ``training.py`` the model, optimiser, one
epoch, validation and the resume checkpoint; ``ranks.py`` every rank's RNG states (the rank context itself is
``stages.core.ranks``, shared with finetune).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Subset
from torchvision.datasets import ImageFolder

from ..core import nets
from ..core.artifacts import CONV_LAYERS_PART, Run, StageResult, read_manifest, sha256_file, sha256_json
from ..core.config import Config
from ..core.errors import InputError, SppError
from ..core.ranks import Ranks, ranks_joined
from ..core.runner import Produced, StagePlan, execute
from .data import (_epoch_generator, _image_tree, _loader, _tree_fingerprint, classification_root, epoch_size,
                   train_transform, val_transform)
from .ranks import _gather_rng_states, _seed_all, _set_rng_state
from .training import (OPTIMIZERS, RESUME_FORMAT, UNTRAINED_FC8_CLASSES, _check_finite_weights,
                       _classification_loss, _load_resume, _torch_save_atomic, _train_epoch, build_model, epoch_lr,
                       evaluate, make_optimizer)

log = logging.getLogger(__name__)
STAGE = "pretrain"
MODEL_FILE = "model.pt"
RESUME_FILE = "checkpoint_last.pt"

__all__ = [
    "STAGE", "MODEL_FILE", "RESUME_FILE", "RESUME_FORMAT", "OPTIMIZERS", "UNTRAINED_FC8_CLASSES", "run",
    "classification_root", "train_transform", "val_transform", "epoch_size", "epoch_lr", "build_model",
    "make_optimizer", "evaluate", "_classification_loss",
]


def run(cfg: Config) -> StageResult:
    """Train (or resume) and write ``model.pt`` + manifest; skipped when already done with this config/data."""
    with ranks_joined(cfg.device) as ranks:
        return _run(cfg, ranks)


def _run(cfg: Config, ranks: Ranks) -> StageResult:
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
                     lock_name=f".lock.rank{ranks.rank}" if ranks.rank else ".lock")  # rank 0 meets a plain run
    if ranks.distributed and not result.skipped:
        dist.barrier()  # rank 0 has written the manifest
    if result.manifest is None:  # another rank: rank 0 has written the model and prints the summary
        manifest = read_manifest(run_dir.manifest_path(STAGE))
        return StageResult(manifest, f"pretrain rank {ranks.rank}/{ranks.world}: done; rank 0 wrote "
                           f"{out_dir / MODEL_FILE}")
    return result


def _train(cfg: Config, ranks: Ranks, config: dict, inputs: dict, trees: dict, out_dir: Path) -> Produced:
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
            log.info("pretrain: resuming after epoch %d from %s", start_epoch, resume_path)
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
            log.info(f"pretrain epoch {epoch + 1}/{pc.epochs} @{size}px lr {lr:g}: train loss {train_loss:.4f} "
                     f"acc {train_acc:.4f}, val loss {val_loss:.4f} acc {val_acc:.4f} "
                     f"({history[-1]['seconds']:.1f} s)")
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
    conv_sha256 = nets.save_checkpoint(model_path, model, meta)
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
        CONV_LAYERS_PART: conv_sha256,  # what conv5 maps depend on (extract-features)
    }
    return Produced(metrics)


def _summary(m: dict, model_path: Path) -> str:
    acc = "n/a" if m.get("val_accuracy") is None else f"{m['val_accuracy']:.4f}"
    chance = "" if not m.get("chance_accuracy") else f" (chance {m['chance_accuracy']:.4f})"
    return (f"pretrain: {m.get('epochs')} epoch(s), {m.get('num_classes')} classes, val accuracy {acc}{chance}, "
            f"weights from {m.get('weights_from')} -> {model_path}")
