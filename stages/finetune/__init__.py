"""``spp finetune``: fc6, fc7 and a new (K+1)-way fc8 trained on SPP-pooled windows [SPEC §4].

What it reads: the pretrained SppNet (``00_pretrain``), the proposals and the conv5 cache of the training split,
the split's annotations. What it writes: ``03_finetune/model.pt`` (the whole SppNet: the pretrained conv layers,
fine-tuned fc6/fc7 and the new fc8; ``class_names = ["__background__"] + classes``), ``history.json`` (the
held-out curve) and the manifest.

The method, as the paper and the released code [S:finetuning/spp_finetune_voc.m] do it:

- windows are the region database's rows (GT first): foreground when the max IoU with any GT is >= 0.5 (label =
  that class + 1), background when it is in [0.1, 0.5) (label 0);
- batches of 128 hold 25% foreground; windows are drawn at random from randomly chosen images (not image-centric)
  and each is pooled at a random scale; the set of images is the training split plus its mirror images;
- conv layers are frozen, so the input is the pooled conv5 feature read from the cache; SGD with momentum 0.9,
  weight decay 5e-4, LR x0.1 at each step, bias LR x2, no weight decay on the fc8 bias; dropout
  ``model.dropout`` (pretraining has its own, ``pretrain.dropout``);
- the new fc8 is N(0, 0.01) with bias 0 (the released prototxt's constant 1 on every class is the same softmax,
  and that bias has no weight decay, so the two trainings are identical);
- every ``eval_every`` iterations, the classification error on fixed held-out batches (best scale, no flip)
  decides which snapshot is kept. Unlike the released code, which picked it on VOC07 *test* (SPEC §9.6), the
  held-out images are a seeded ``holdout_fraction`` of the training split; the test split is never read.

Pooling strategy (the released ``PrepareBatchData``): the windows of the next ``chunk`` iterations are drawn in
advance (images in random order until they hold 10x the windows the chunk needs, then windows at random among
them), grouped by image so that each image's conv5 maps are read from the cache once per chunk, pooled at their
random scales straight into one float16 buffer of ``chunk x batch_size x D`` (``finetune.pool_memory_mb``; the
cache itself is float16, so nothing is lost) on the compute device, then consumed batch by batch. The sample is
the same as drawing every batch independently; only the reading order changes. The held-out batches are pooled
once (float16, ``holdout_batches x batch_size x D``).

``--conv`` (beyond the paper) also trains the conv layers through the SPP layer: each step runs the backbone on
``finetune.conv_images`` randomly chosen (possibly mirrored) training images, each at a random scale of
``features.scales``, and pools from each its share of the foreground windows plus three background windows per
foreground one (so 25% foreground, as the cached path) on the live map with ``spp.pool_windows``, whose max
pooling passes gradients back like RoI pooling. The held-out batches are then pooled from live maps at every
evaluation. Such a model's ftfc6/ftfc7 are computed from conv5 maps of its own conv layers (``spp
extract-features --conv-from finetune``, and ``spp train-bbox --conv-from finetune`` for its box regressors).
Conv LR = ``lr * conv_lr_factor``; batch-norm statistics (torchvision trunks) stay frozen. The trunk's first
``finetune.conv_frozen_layers`` layers can stay frozen: their output is then computed once per image, mirror and
scale (kept within ``conv_memo_mb``), so a step runs only the layers that learn.

A resume point (``resume.pt``: weights, optimiser, best snapshot, history and random-generator states) is written
at chunk ends at most every ``checkpoint_every_s`` seconds; a rerun with the same config and inputs continues from
it and gives, on CPU, the same result as an uninterrupted run.

Several processes (``--nproc-per-node N``, or torchrun): DistributedDataParallel, gloo on CPU, nccl with one GPU
each. ``finetune.batch_size`` stays the global batch: every rank draws the same batches from the same seeded
streams and pools and trains on its own rows of each (with ``--conv``: the batch's images r::N), so the gradient
is one process's up to float rounding; the held-out batches are shared out and the counts summed, so all ranks
keep the same snapshot; rank 0 alone writes ``model.pt``, ``history.json``, ``resume.pt`` and the manifest. With
``model.dropout = 0`` the model is one process's to float rounding (tested with 2 gloo processes); dropout
masks come from per-rank streams (seed + rank), so with dropout the run is another sample of the same training.

The code: this package's ``__init__`` is the stage (its plan, ``run`` and the model it writes); ``windows.py``
selects, draws and pools the training windows and splits off the held-out images; ``training.py`` is the
training loop (optimiser, schedule, held-out error, resume point); ``cached.py`` pools windows from the conv5
cache (the paper's path); ``conv.py`` pools them through the live backbone (``--conv``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.artifacts import (CONV_LAYERS_PART, Manifest, Run, StageResult, atomic_write_json, read_manifest,
                              sha256_json)
from ..core.config import Config
from ..core.errors import SppError
from ..core.ranks import Ranks, all_sum, barrier, ranks_joined
from ..core.roidb import build_roidb
from ..core.runner import Produced, StagePlan, execute
from ..core.nets import BACKGROUND
from ..core.voc import VocDataset
from .cached import cached_pooler
from .conv import FrozenMemo, _live_poolers, split_trunk
from .training import (BIAS_LR_MULT, TrainResult, _Resume, classification_error, lr_at, make_optimizer, set_lr,
                       train)
from .windows import (IMAGE_OVERSAMPLE, Draw, Entry, Pooler, batch_split, draw_batches, has_windows,
                      learning_subset, make_entries, pool_draw, rank_rows, select_windows, split_holdout)

STAGE = "finetune"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
RESUME_FILE = "resume.pt"  # the training state at the last safe point (``training._Resume``)

__all__ = [
    "STAGE", "MODEL_FILE", "HISTORY_FILE", "RESUME_FILE", "BACKGROUND", "IMAGE_OVERSAMPLE", "BIAS_LR_MULT",
    "run", "stage_config",
    "Entry", "Draw", "Pooler", "select_windows", "has_windows", "make_entries", "split_holdout", "learning_subset",
    "batch_split", "draw_batches", "pool_draw", "rank_rows",
    "TrainResult", "lr_at", "make_optimizer", "set_lr", "classification_error", "train",
    "cached_pooler", "_live_poolers", "FrozenMemo", "split_trunk",
]


# -- the stage -----------------------------------------------------------------------------------------------------
def stage_config(cfg: Config) -> dict:
    """Everything the result depends on (the device is left out: it changes speed, not the method)."""
    return {"finetune": cfg.section("finetune"), "model": cfg.section("model"),
            "features": {"scales": list(cfg.features.scales), "scale_rule": cfg.features.scale_rule},
            "train_split": cfg.data.train_split, "seed": cfg.seed}


def _pretrained_model_path(manifest: Manifest) -> Path:
    return manifest.output("model") if "model" in manifest.data.get("outputs", {}) else manifest.folder / MODEL_FILE


def _summary(m: dict, model_path: Path) -> str:
    best = m.get("best_holdout_error")
    held = (f"held-out error {best:.4f} at iteration {m.get('best_iteration')} (initial "
            f"{m.get('initial_holdout_error', float('nan')):.4f}, final {m.get('final_holdout_error', float('nan')):.4f})"
            if best is not None else "no held-out images: kept the last iteration")
    return (f"finetune: {m.get('iterations')} iterations in {m.get('seconds', 0):.1f} s "
            f"({m.get('windows_per_s', 0):.0f} windows/s); {held}; model: {model_path}")


def run(cfg: Config) -> StageResult:
    """``spp finetune``: see the module docstring."""
    with ranks_joined(cfg.device) as ranks:
        return _run(cfg, ranks)


def _run(cfg: Config, ranks: Ranks) -> StageResult:
    ft = cfg.finetune
    run_dir = Run(cfg.run_dir)
    split = cfg.data.train_split
    if split == cfg.data.test_split:  # a stage's rule, not a config invariant: eval on the training split is fine
        raise SppError(f"data.train_split and data.test_split are both {split!r}: fine-tuning must not see the "
                       "test split")
    dataset = VocDataset.from_config(cfg.data)
    inputs: dict = {"pretrain": run_dir.require("pretrain"), "proposals": run_dir.require("proposals", split)}
    if not ft.conv:
        inputs["features"] = run_dir.require("features", split)
    inputs["dataset"] = dataset.fingerprint(split)
    config = stage_config(cfg)
    # Every rank needs a share of each batch (with --conv: of its images), else DDP would wait for its gradients.
    shared, what = (ft.conv_images, "finetune.conv_images") if ft.conv else (ft.batch_size, "finetune.batch_size")
    if shared < ranks.world:
        raise SppError(f"{what} {shared} is smaller than the {ranks.world} torchrun ranks")
    plan = StagePlan(STAGE, None, config, inputs, {"model": MODEL_FILE, "history": HISTORY_FILE})
    model_path = run_dir.stage_dir(STAGE) / MODEL_FILE
    result = execute(run_dir, plan, lambda folder: _finetune(cfg, ranks, run_dir, dataset, inputs, config, folder),
                     describe=lambda metrics: _summary(metrics, model_path), cfg=cfg,
                     lock_name=f".lock.rank{ranks.rank}" if ranks.rank else ".lock")  # rank 0 meets a plain run
    if ranks.distributed and not result.skipped:
        barrier(ranks)  # rank 0 has written the manifest
    if result.manifest is None:  # another rank: rank 0 has written the model and prints the summary
        manifest = read_manifest(run_dir.manifest_path(STAGE))
        return StageResult(manifest, f"finetune rank {ranks.rank}/{ranks.world}: done; rank 0 wrote {model_path}")
    return result


def _finetune(cfg: Config, ranks: Ranks, run_dir: Run, dataset: VocDataset, inputs: dict, config: dict,
              folder: Path) -> Produced:
    from ..core import nets, spp
    from ..core.proposals import load_proposals

    ft = cfg.finetune
    split = cfg.data.train_split
    device = ranks.device

    # The model: pretrained conv + fc6/fc7 with model.dropout, a new (K+1)-way fc8: seeded N(0, 0.01), bias 0.
    pretrained_path = _pretrained_model_path(inputs["pretrain"])
    model, pre_meta = nets.load_checkpoint(pretrained_path, expect_backbone=cfg.model.backbone)
    model.head.set_dropout(cfg.model.dropout)
    class_names = [BACKGROUND, *dataset.classes]
    torch.manual_seed(cfg.seed)
    model.head.replace_fc8(len(class_names))
    nn.init.zeros_(model.head.fc8.bias)
    pyramid = tuple(model.pyramid)
    spec = model.backbone.spec
    dim = spp.spp_dim(spec.channels, pyramid)
    if model.head.fc6.in_features != dim:
        raise SppError(f"fc6 takes {model.head.fc6.in_features} inputs but SPP over {spec.channels} channels with "
                       f"pyramid {list(pyramid)} gives {dim}", pretrained_path)

    # Windows of the training images, split into train / held-out images.
    proposals = load_proposals(run_dir, split)
    roidb = build_roidb(dataset, split, proposals)
    # Held-out images are drawn among those with windows: an image with none (no objects and no proposals)
    # could not give a held-out batch; it stays with the training images, where it is simply never drawn.
    with_windows = [r.image_id for r in roidb if has_windows(r, ft.fg_iou, ft.bg_iou)]
    _, holdout_ids = split_holdout(with_windows, ft.holdout_fraction, cfg.seed)
    holdout_set = set(holdout_ids)
    train_rois = [r for r in roidb if r.image_id not in holdout_set]
    holdout_rois = [r for r in roidb if r.image_id in holdout_set]
    train_rois = learning_subset(train_rois, ft.train_images, cfg.seed)

    if ft.conv:
        flip_used = ft.flip
        pooler, live_batch = _live_poolers(model, dataset, spec, cfg.features.scales, pyramid,
                                           cfg.features.scale_rule, device, ft.conv_images,
                                           frozen_layers=ft.conv_frozen_layers, memo_mb=ft.conv_memo_mb)
        model.to(device)
        backbone = model.backbone
    else:
        pooler, flip_used = cached_pooler(cfg, run_dir, inputs["features"], roidb, pre_meta, spec, pyramid,
                                          device)
        live_batch = None
        backbone = None
        model.head.to(device)

    entries = make_entries(train_rois, ft.fg_iou, ft.bg_iou, flip_used)
    holdout_entries = make_entries(holdout_rois, ft.fg_iou, ft.bg_iou, flip=False)
    resume_key = sha256_json({"config": config, "inputs": {k: v.fingerprint if isinstance(v, Manifest) else v
                                                             for k, v in inputs.items()}})
    result = train(model.head, entries, holdout_entries, pooler, dim, ft, cfg.seed, device, backbone=backbone,
                   live_batch=live_batch, resume_path=folder / RESUME_FILE, resume_key=resume_key, ranks=ranks)
    memo = live_batch.memo if ft.conv else None
    memo_sums = all_sum([memo.hits, memo.misses, memo.bytes], ranks) if memo else None  # each rank has its own
    if not ranks.is_main:
        return Produced({}, write_manifest=False)

    # Save the best snapshot as a whole SppNet checkpoint.
    best = {k.split(".", 1)[1]: v for k, v in result.best_state.items() if k.startswith("head.")}
    model.head.load_state_dict(best)
    if ft.conv:
        model.backbone.load_state_dict({k.split(".", 1)[1]: v for k, v in result.best_state.items()
                                        if k.startswith("backbone.")})
    model.cpu()
    meta = {**{k: v for k, v in pre_meta.items() if k not in ("class_names", "num_classes")},
            "backbone": pre_meta.get("backbone", cfg.model.backbone), "pyramid": list(pyramid),
            "fc_dim": model.head.fc6.out_features, "num_classes": len(class_names), "class_names": class_names,
            "finetuned": True, "conv_finetuned": ft.conv, "finetune_iteration": result.metrics["best_iteration"],
            "holdout_error": result.metrics["best_holdout_error"], "pretrained_from": str(pretrained_path)}
    conv_sha256 = nets.save_checkpoint(folder / MODEL_FILE, model, meta)  # atomic
    atomic_write_json(folder / HISTORY_FILE, result.history)

    n_fg = sum(len(e.fg_labels) for e in entries)
    n_bg = sum(len(e.bg_boxes) for e in entries)
    metrics = {**result.metrics, "train_images": len(train_rois), "holdout_images": len(holdout_rois),
               "train_entries": len(entries), "fg_windows": n_fg, "bg_windows": n_bg, "flip_used": flip_used,
               "num_classes": len(class_names), "device": str(device), "world_size": ranks.world,
               "conv": ft.conv,
               "pool_strategy": "per-iteration live pooling (conv)" if ft.conv else
               "chunked pre-draw, one cache read per image per chunk, float16 buffer on the compute device",
               CONV_LAYERS_PART: conv_sha256}
    if ft.conv:  # summed over the ranks
        hits, misses, memo_bytes = memo_sums
        metrics.update({"conv_frozen_layers": ft.conv_frozen_layers, "frozen_memo_hits": int(hits),
                        "frozen_memo_misses": int(misses), "frozen_memo_mb": memo_bytes / 2**20})
    _Resume(folder / RESUME_FILE, resume_key, 0).remove()
    return Produced(metrics)
