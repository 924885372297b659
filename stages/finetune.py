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
Conv LR = ``lr * conv_lr_factor``; batch-norm statistics (torchvision trunks) stay frozen.

A resume point (``resume.pt``: weights, optimiser, best snapshot, history and random-generator states) is written
at chunk ends at most every ``checkpoint_every_s`` seconds; a rerun with the same config and inputs continues from
it and gives, on CPU, the same result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .core.artifacts import Manifest, Run, StageResult, atomic_write_json, read_manifest, sha256_json
from .core.boxes import flip_boxes
from .core.config import Config, FinetuneConfig
from .core.errors import SppError
from .core.runner import Produced, StagePlan, execute
from .core.roidb import ImageRois, build_roidb, max_overlap
from .core.voc import VocDataset, resolve_voc_root

STAGE = "finetune"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
RESUME_FILE = "resume.pt"
IMAGE_OVERSAMPLE = 10  # released PrepareBatchData: images are taken until they hold 10x the windows a chunk needs
BIAS_LR_MULT = 2.0  # Caffe blobs_lr 1, 2 on every fc layer [S:pascal_finetune_fc_spm_train.prototxt]
BACKGROUND = "__background__"


# -- windows ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One training image as fine-tuning sees it (itself or its mirror), with its candidate windows.
    Boxes are in the original (unflipped) image's coordinates; ``flip`` tells the pooler to mirror."""

    image_id: str
    width: int
    height: int
    flip: bool
    fg_boxes: np.ndarray  # float64 [F, 4]
    fg_labels: np.ndarray  # int64 [F], class index + 1
    bg_boxes: np.ndarray  # float64 [B, 4]


def select_windows(roi: ImageRois, fg_iou: float = 0.5,
                   bg_iou: tuple[float, float] = (0.1, 0.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``roi`` used for fine-tuning: foreground rows (max IoU >= fg_iou, GT rows included) with their
    labels (argmax class + 1), and background rows (max IoU in [bg_iou[0], bg_iou[1]), not foreground)."""
    best, cls = max_overlap(roi)
    fg = best >= np.float32(fg_iou)
    bg = ~fg & (best >= np.float32(bg_iou[0])) & (best < np.float32(bg_iou[1]))
    return np.flatnonzero(fg), cls[fg] + 1, np.flatnonzero(bg)


def has_windows(roi: ImageRois, fg_iou: float = 0.5, bg_iou: tuple[float, float] = (0.1, 0.5)) -> bool:
    """Does the image have any foreground or background window (an image without objects and proposals has none)?"""
    fg_rows, _, bg_rows = select_windows(roi, fg_iou, bg_iou)
    return len(fg_rows) + len(bg_rows) > 0


def make_entries(roidb: list[ImageRois], fg_iou: float, bg_iou: tuple[float, float], flip: bool) -> list[Entry]:
    """One entry per image, plus one per mirrored image when ``flip`` (labels are flip-invariant)."""
    entries = []
    for roi in roidb:
        fg_rows, fg_labels, bg_rows = select_windows(roi, fg_iou, bg_iou)
        for mirrored in (False, True) if flip else (False,):
            entries.append(Entry(roi.image_id, roi.width, roi.height, mirrored, roi.boxes[fg_rows],
                                 fg_labels, roi.boxes[bg_rows]))
    return entries


def split_holdout(image_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids): a seeded random ``fraction`` of the images, at least one on each side when
    ``fraction > 0``; both lists keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise SppError(f"finetune.holdout_fraction must be in [0, 1), got {fraction}")
    n = len(image_ids)
    n_hold = 0 if fraction == 0 or n < 2 else min(max(1, int(math.floor(fraction * n + 0.5))), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_hold].tolist())
    return ([i for k, i in enumerate(image_ids) if k not in held], [i for k, i in enumerate(image_ids) if k in held])


def batch_split(batch_size: int, fg_fraction: float) -> tuple[int, int]:
    """(foreground, background) windows per batch; 128 x 0.25 -> (32, 96). MATLAB int32() rounds half away."""
    n_fg = int(math.floor(fg_fraction * batch_size + 0.5))
    return n_fg, batch_size - n_fg


@dataclass(frozen=True)
class Draw:
    """Windows drawn for ``n_batches`` batches. Row ``rows[i]`` of the batch buffer gets window i; batch b is
    buffer rows ``b*batch_size .. (b+1)*batch_size``, foreground slots first."""

    entry: np.ndarray  # int64 [N], index into the entry list
    boxes: np.ndarray  # float64 [N, 4], original image coordinates
    labels: np.ndarray  # int64 [N]
    rows: np.ndarray  # int64 [N]
    n_batches: int
    batch_size: int


def draw_batches(entries: list[Entry], n_batches: int, batch_size: int, fg_fraction: float,
                 rng: np.random.Generator, oversample: int = IMAGE_OVERSAMPLE) -> Draw:
    """Windows for the next ``n_batches`` batches, as the released ``PrepareBatchData`` draws them: images in
    random order until they hold ``oversample`` times the foreground and background windows needed (all images
    when they do not), then windows at random among those images, without replacement unless too few."""
    n_fg, n_bg = batch_split(batch_size, fg_fraction)
    fg_total, bg_total = n_fg * n_batches, n_bg * n_batches
    order = rng.permutation(len(entries))
    fg_count = np.array([len(entries[i].fg_labels) for i in order], dtype=np.int64)
    bg_count = np.array([len(entries[i].bg_boxes) for i in order], dtype=np.int64)
    ends = [int(np.searchsorted(np.cumsum(fg_count), fg_total * oversample, side="right")),
            int(np.searchsorted(np.cumsum(bg_count), bg_total * oversample, side="right"))]
    end = len(order) if max(ends) >= len(order) else max(ends) + 1
    chosen = order[:end]

    parts = []
    for kind, total, per_batch, offset in (("fg", fg_total, n_fg, 0), ("bg", bg_total, n_bg, n_fg)):
        if total == 0:
            continue
        counts = fg_count[:end] if kind == "fg" else bg_count[:end]
        if counts.sum() == 0:
            what = "foreground (max IoU >= fg_iou)" if kind == "fg" else "background (max IoU in bg_iou)"
            raise SppError(f"no {what} windows among {len(chosen)} fine-tuning images: check the proposals "
                           "and finetune.fg_iou / finetune.bg_iou")
        owner = np.repeat(chosen, counts)
        pool_boxes = np.concatenate([entries[e].fg_boxes if kind == "fg" else entries[e].bg_boxes for e in chosen])
        pick = rng.choice(len(owner), size=total, replace=len(owner) < total)
        slot = np.arange(total)
        rows = (slot // per_batch) * batch_size + offset + slot % per_batch
        labels = (np.concatenate([entries[e].fg_labels for e in chosen])[pick] if kind == "fg"
                  else np.zeros(total, np.int64))
        parts.append((owner[pick].astype(np.int64), pool_boxes[pick], labels.astype(np.int64), rows.astype(np.int64)))
    return Draw(*(np.concatenate([p[k] for p in parts]) for k in range(4)), n_batches=n_batches,
                batch_size=batch_size)


# Pools a list of windows of one entry: (entry, boxes [n,4], scale choice "best" | "random", rng) -> [n, D].
Pooler = Callable[[Entry, np.ndarray, str, np.random.Generator], torch.Tensor]


def pool_draw(draw: Draw, entries: list[Entry], pooler: Pooler, dim: int, scale_choice: str,
              rng: np.random.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every drawn window into a float16 [n_batches * batch_size, dim] buffer (one pooler call per image,
    images in index order so that the random scales are reproducible) and its int64 labels."""
    total = draw.n_batches * draw.batch_size
    features = torch.empty((total, dim), dtype=torch.float16, device=device)
    labels = torch.empty(total, dtype=torch.int64)
    labels[torch.from_numpy(draw.rows)] = torch.from_numpy(draw.labels)
    order = np.argsort(draw.entry, kind="stable")
    uniq, starts = np.unique(draw.entry[order], return_index=True)
    for e, a, b in zip(uniq, starts, [*starts[1:], len(order)]):
        sel = order[a:b]
        pooled = pooler(entries[int(e)], draw.boxes[sel], scale_choice, rng)
        if pooled.shape != (len(sel), dim):
            raise SppError(f"pooled features of image {entries[int(e)].image_id!r} have shape "
                           f"{tuple(pooled.shape)}, expected ({len(sel)}, {dim})")
        features[torch.from_numpy(draw.rows[sel]).to(device)] = pooled.detach().to(device, torch.float16)
    return features, labels.to(device)


# -- optimisation -------------------------------------------------------------------------------------------------
def lr_at(ft: FinetuneConfig, iteration: int) -> float:
    """Base LR for 0-based ``iteration``: ``lr`` times 0.1 per step in ``lr_steps`` already reached."""
    return ft.lr * 0.1 ** sum(iteration >= step for step in ft.lr_steps)


def make_optimizer(head: nn.Module, ft: FinetuneConfig, backbone: nn.Module | None = None) -> torch.optim.SGD:
    """SGD param groups with an ``lr_mult`` each: fc weights x1 (decayed), fc6/fc7 biases x2 (decayed, Caffe's
    default), fc8 bias x2 without decay [S:pascal_finetune_fc_spm_train.prototxt]; with ``backbone``: its
    weights x conv_lr_factor (decayed), its 1-d parameters (biases, norms) x 2*conv_lr_factor without decay."""
    fc8_bias = head.fc8.bias
    groups = [
        {"params": [p for n, p in head.named_parameters() if not n.endswith("bias")], "lr_mult": 1.0,
         "weight_decay": ft.weight_decay},
        {"params": [p for n, p in head.named_parameters() if n.endswith("bias") and p is not fc8_bias],
         "lr_mult": BIAS_LR_MULT, "weight_decay": ft.weight_decay},
        {"params": [fc8_bias], "lr_mult": BIAS_LR_MULT, "weight_decay": 0.0},
    ]
    if backbone is not None:
        trunk = [p for p in backbone.parameters() if p.requires_grad]
        groups += [
            {"params": [p for p in trunk if p.ndim > 1], "lr_mult": ft.conv_lr_factor, "weight_decay": ft.weight_decay},
            {"params": [p for p in trunk if p.ndim <= 1], "lr_mult": BIAS_LR_MULT * ft.conv_lr_factor,
             "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = ft.lr * group["lr_mult"]
    return torch.optim.SGD(groups, lr=ft.lr, momentum=ft.momentum)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_mult"]


@torch.no_grad()
def classification_error(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                         batch_size: int) -> tuple[float, float]:
    """(error, mean cross-entropy) of ``head`` in eval mode (no dropout) over fixed batches."""
    was_training = head.training
    head.eval()
    wrong, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = head(features[start:start + batch_size].float())
        target = labels[start:start + batch_size]
        wrong += int((logits.argmax(1) != target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    head.train(was_training)
    return wrong / max(1, len(labels)), loss_sum / max(1, len(labels))


def _freeze_batchnorm(module: nn.Module) -> None:
    """Keep batch-norm running statistics fixed: two images per step are no batch to estimate them from."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass
class TrainResult:
    best_state: dict | None  # state_dict of the trained module(s) at the best held-out error (None: no held-out)
    history: list[dict]
    metrics: dict


class _Resume:
    """``resume.pt``: the training state at a safe point (no drawn-but-unused windows), keyed by config+inputs."""

    def __init__(self, path: Path | None, key: str, every_s: float):
        self.path, self.key, self.every_s = path, key, every_s
        self.last = time.monotonic()

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file just means "start clean"
            warnings.warn(f"{self.path}: unreadable resume point ({type(exc).__name__}); starting over", stacklevel=2)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None  # made with another config or other inputs
        return state

    def maybe_save(self, make_state: Callable[[], dict], force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self.last < self.every_s):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"key": self.key, **make_state()}, tmp)
        os.replace(tmp, self.path)
        self.last = time.monotonic()

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def train(head: nn.Module, entries: list[Entry], holdout_entries: list[Entry], pooler: Pooler, dim: int,
          ft: FinetuneConfig, seed: int, device: torch.device, *, backbone: nn.Module | None = None,
          live_batch: Callable | None = None, resume_path: Path | None = None, resume_key: str = "",
          chunk_iters: int | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune ``head`` (and ``backbone`` when given, with ``live_batch(entries, n_fg, n_bg, rng)`` returning
    one step's pooled features, with gradients, and labels) for ``ft.iters`` iterations; returns the best
    held-out snapshot (keys ``head.*`` and, with a backbone, ``backbone.*``).

    Random streams (all from ``seed``): the held-out draw, the training draws and scales, and torch's (dropout)."""
    conv = backbone is not None
    if not any(len(e.fg_labels) + len(e.bg_boxes) for e in entries):
        raise SppError(f"none of the {len(entries)} fine-tuning images has a window with max IoU >= "
                       f"{ft.bg_iou[0]}: check the proposals")
    modules = nn.ModuleDict({"head": head, **({"backbone": backbone} if conv else {})})
    holdout_rng, train_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    torch.manual_seed(seed)
    optimizer = make_optimizer(head, ft, backbone)
    n_fg, n_bg = batch_split(ft.batch_size, ft.fg_fraction)
    bytes_per_batch = ft.batch_size * dim * 2
    if chunk_iters is None:  # iterations whose windows are pooled at once, within the memory budget
        chunk_iters = 1 if conv else max(1, min(ft.iters, ft.pool_memory_mb * 2**20 // bytes_per_batch))

    # Fixed held-out batches (best scale, no flip); pooled once unless the conv layers change.
    holdout = None
    if holdout_entries and ft.holdout_batches > 0:
        holdout_draw = draw_batches(holdout_entries, ft.holdout_batches, ft.batch_size, ft.fg_fraction, holdout_rng)
        holdout = holdout_draw if conv else pool_draw(holdout_draw, holdout_entries, pooler, dim, "best",
                                                      holdout_rng, device)

    def evaluate() -> tuple[float | None, float | None]:
        if holdout is None:
            return None, None  # no held-out images (JSON null, not NaN)
        if conv:
            backbone.eval()
            with torch.no_grad():
                feats, labels = pool_draw(holdout, holdout_entries, pooler, dim, "best", holdout_rng, device)
            backbone.train()
            _freeze_batchnorm(backbone)
        else:
            feats, labels = holdout
        return classification_error(head, feats, labels, ft.batch_size)

    resume = _Resume(resume_path, resume_key, ft.checkpoint_every_s)
    state = resume.load()
    history: list[dict] = []
    best_state, best_error, best_iter = None, math.inf, 0
    start, train_loss, train_wrong, train_seen = 0, 0.0, 0, 0
    initial_error, _ = evaluate() if state is None else (state["initial_error"], None)
    if state is not None:
        modules.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state, best_error, best_iter = state["best_state"], state["best_error"], state["best_iter"]
        history, start = state["history"], state["iteration"]
        train_loss, train_wrong, train_seen = state["train_loss"], state["train_wrong"], state["train_seen"]
        train_rng.bit_generator.state = state["train_rng"]
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    def snapshot_state() -> dict:
        out = {"model": modules.state_dict(), "optimizer": optimizer.state_dict(), "best_state": best_state,
               "best_error": best_error, "best_iter": best_iter, "history": history, "iteration": it,
               "train_loss": train_loss, "train_wrong": train_wrong, "train_seen": train_seen,
               "train_rng": train_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
               "initial_error": initial_error}
        if torch.cuda.is_available():
            out["cuda_rng"] = torch.cuda.get_rng_state()
        return out

    modules.train()
    if conv:
        _freeze_batchnorm(backbone)
    started, pool_seconds, windows = time.perf_counter(), 0.0, 0
    chunk, chunk_pos = None, 0
    bar = tqdm(total=ft.iters, initial=start, desc="finetune", unit="it", mininterval=1.0, dynamic_ncols=True,
               disable=None if progress else True)  # None: shown on a terminal only
    it = start
    try:
        while it < ft.iters:
            if conv:
                features, labels = live_batch(entries, n_fg, n_bg, train_rng)
            else:
                if chunk is None or chunk_pos == chunk[0].shape[0]:
                    tic = time.perf_counter()
                    n = min(chunk_iters, ft.iters - it)
                    chunk = pool_draw(draw_batches(entries, n, ft.batch_size, ft.fg_fraction, train_rng), entries,
                                      pooler, dim, "random", train_rng, device)
                    chunk_pos = 0
                    pool_seconds += time.perf_counter() - tic
                features = chunk[0][chunk_pos:chunk_pos + ft.batch_size].float()
                labels = chunk[1][chunk_pos:chunk_pos + ft.batch_size]
                chunk_pos += ft.batch_size
            set_lr(optimizer, lr_at(ft, it))
            logits = head(features)
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                raise SppError(f"fine-tuning loss became {loss.item()} at iteration {it + 1}; "
                               f"lower finetune.lr (now {ft.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            windows += len(labels)
            train_loss += loss.item() * len(labels)
            train_wrong += int((logits.detach().argmax(1) != labels).sum())
            train_seen += len(labels)
            bar.update(1)
            if it % 10 == 0 or it == ft.iters:
                bar.set_postfix(loss=f"{train_loss / max(1, train_seen):.3f}", lr=f"{lr_at(ft, it - 1):.0e}",
                                best=f"{best_error:.3f}" if best_error < math.inf else "-")
            if it % ft.eval_every == 0 or it == ft.iters:
                error, held_loss = evaluate()
                history.append({"iteration": it, "lr": lr_at(ft, it - 1), "holdout_error": error,
                                "holdout_loss": held_loss, "train_loss": train_loss / max(1, train_seen),
                                "train_error": train_wrong / max(1, train_seen)})
                train_loss, train_wrong, train_seen = 0.0, 0, 0
                if error is not None and error < best_error:  # strict: the earliest of equal snapshots
                    best_error, best_iter = error, it
                    best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
                    bar.write(f"iteration {it}: held-out error {error:.4f} (best)")
                elif error is not None:
                    bar.write(f"iteration {it}: held-out error {error:.4f}")
            if conv or chunk_pos == chunk[0].shape[0]:
                resume.maybe_save(snapshot_state, force=ft.checkpoint_every_s <= 0)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    final = history[-1] if history else {}
    metrics = {
        "iterations": ft.iters,
        "resumed_from": start,
        "seconds": seconds,
        "pool_seconds": pool_seconds,
        "windows_per_s": windows / seconds if seconds > 0 else 0.0,
        "initial_holdout_error": initial_error,
        "final_holdout_error": final.get("holdout_error"),
        "best_holdout_error": best_error if best_error < math.inf else None,
        "best_iteration": best_iter if best_state is not None else ft.iters,
        "chunk_iters": chunk_iters,
        "chunk_mb": chunk_iters * bytes_per_batch / 2**20 if not conv else 0.0,
        "holdout_mb": ft.holdout_batches * bytes_per_batch / 2**20 if holdout is not None and not conv else 0.0,
    }
    if best_state is None:  # no held-out images: the last iteration is the result
        best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    return TrainResult(best_state=best_state, history=history, metrics=metrics)


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
    ft = cfg.finetune
    run_dir = Run(cfg.run_dir)
    split = cfg.data.train_split
    dataset = VocDataset.from_config(cfg.data)
    inputs: dict = {"pretrain": run_dir.require("pretrain"), "proposals": run_dir.require("proposals", split)}
    if not ft.conv:
        inputs["features"] = run_dir.require("features", split)
    inputs["dataset"] = dataset.fingerprint(split)
    config = stage_config(cfg)
    plan = StagePlan(STAGE, None, config, inputs, {"model": MODEL_FILE, "history": HISTORY_FILE})
    return execute(run_dir, plan, lambda folder: _finetune(cfg, run_dir, dataset, inputs, config, folder),
                   describe=lambda metrics: _summary(metrics, run_dir.stage_dir(STAGE) / MODEL_FILE), cfg=cfg)


def _finetune(cfg: Config, run_dir: Run, dataset: VocDataset, inputs: dict, config: dict, folder: Path) -> Produced:
    from .core import nets, spp
    from .core.proposals import load_proposals

    ft = cfg.finetune
    split = cfg.data.train_split
    device = nets.resolve_device(cfg.device)

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

    if ft.conv:
        flip_used = ft.flip
        pooler, live_batch = _live_poolers(model, dataset, spec, cfg.features.scales, pyramid,
                                           cfg.features.scale_rule, device, ft.conv_images)
        model.to(device)
        backbone = model.backbone
    else:
        from .core.features import features_for

        cache = features_for(run_dir, split)
        cache_file = inputs["features"].folder
        if cache.backbone != pre_meta.get("backbone", cfg.model.backbone):
            raise SppError(f"the conv5 cache was made with backbone {cache.backbone!r} but the pretrained model is "
                           f"{pre_meta.get('backbone')!r}; rerun `spp extract-features --split {split}`", cache_file)
        if cache.spec.channels != spec.channels:
            raise SppError(f"the conv5 cache has {cache.spec.channels} channels, the model {spec.channels}",
                           cache_file)
        missing = [r.image_id for r in roidb if r.image_id not in cache]
        if missing:
            raise SppError(f"the conv5 cache lacks {len(missing)} image(s) of split {split!r} (e.g. {missing[0]!r}); "
                           f"rerun `spp extract-features --split {split}`", cache_file)
        flip_used = ft.flip and cache.has_flip
        if ft.flip and not cache.has_flip:
            warnings.warn(f"{cache_file}: the conv5 cache holds no mirrored maps; fine-tuning without flips "
                          "(set features.flip = true and rerun extract-features to train on flips)", stacklevel=2)
        rule = cfg.features.scale_rule

        def pooler(entry: Entry, boxes: np.ndarray, scale_choice: str, rng: np.random.Generator) -> torch.Tensor:
            return cache.pooled(entry.image_id, boxes, pyramid, scale_choice=scale_choice, rng=rng,
                                flip=entry.flip, device=device, rule=rule)

        live_batch = None
        backbone = None
        model.head.to(device)

    entries = make_entries(train_rois, ft.fg_iou, ft.bg_iou, flip_used)
    holdout_entries = make_entries(holdout_rois, ft.fg_iou, ft.bg_iou, flip=False)
    resume_key = sha256_json({"config": config, "inputs": {k: v.fingerprint if isinstance(v, Manifest) else v
                                                             for k, v in inputs.items()}})
    result = train(model.head, entries, holdout_entries, pooler, dim, ft, cfg.seed, device, backbone=backbone,
                   live_batch=live_batch, resume_path=folder / RESUME_FILE, resume_key=resume_key)

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
    nets.save_checkpoint(folder / MODEL_FILE, model, meta)  # atomic
    atomic_write_json(folder / HISTORY_FILE, result.history)

    n_fg = sum(len(e.fg_labels) for e in entries)
    n_bg = sum(len(e.bg_boxes) for e in entries)
    metrics = {**result.metrics, "train_images": len(train_rois), "holdout_images": len(holdout_rois),
               "train_entries": len(entries), "fg_windows": n_fg, "bg_windows": n_bg, "flip_used": flip_used,
               "num_classes": len(class_names), "device": str(device), "conv": ft.conv,
               "pool_strategy": "per-iteration live pooling (conv)" if ft.conv else
               "chunked pre-draw, one cache read per image per chunk, float16 buffer on the compute device"}
    _Resume(folder / RESUME_FILE, resume_key, 0).remove()
    return Produced(metrics)


def _live_poolers(model: nn.Module, dataset: VocDataset, spec, scales: tuple[int, ...], pyramid: tuple[int, ...],
                  rule: str, device: torch.device, images_per_batch: int = 2):
    """--conv: (held-out pooler, training batch maker), both running the backbone on the image itself."""
    from .core import nets, spp

    def image_and_boxes(entry: Entry, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = dataset.load_image(entry.image_id)
        if entry.flip:
            return np.ascontiguousarray(image[:, ::-1]), flip_boxes(boxes, entry.width)
        return image, boxes

    def pool_at(image: np.ndarray, boxes: np.ndarray, scale_index: np.ndarray) -> torch.Tensor:
        used = np.unique(scale_index)
        maps = [model.backbone(nets.preprocess(image, scales[u], spec, device=device)[None])[0] for u in used]
        return spp.pool_windows(maps, image.shape[:2], [scales[u] for u in used], boxes, spec, pyramid,
                                scale_index=np.searchsorted(used, scale_index), rule=rule)

    def pooler(entry: Entry, boxes: np.ndarray, scale_choice: str, rng: np.random.Generator) -> torch.Tensor:
        image, boxes = image_and_boxes(entry, boxes)
        if scale_choice == "best":
            index = np.asarray(spp.choose_scale(boxes, image.shape[:2], scales, rule=rule), dtype=np.int64)
        else:
            index = rng.integers(len(scales), size=len(boxes))
        return pool_at(image, boxes, index)

    def live_batch(entries: list[Entry], n_fg: int, n_bg: int, rng: np.random.Generator):
        """Windows of ``images_per_batch`` random images (or mirrors), each at one random scale. Each image gives
        up to its share of the ``n_fg`` foreground windows and ``n_bg / n_fg`` background windows per foreground
        one, so the batch keeps the cached path's foreground fraction even when an image has only a few
        foreground windows (filling up with background instead taught the net to call everything background)."""
        with_fg = [e for e in entries if len(e.fg_labels)] if n_fg else []
        pool = with_fg or [e for e in entries if len(e.bg_boxes)]
        if not pool:
            raise SppError("no training image has a foreground or background window to fine-tune on")
        fg_share = math.ceil(n_fg / images_per_batch)
        bg_per_fg = n_bg / n_fg if n_fg else 0.0
        features, labels = [], []
        for _ in range(images_per_batch):
            entry = pool[int(rng.integers(len(pool)))]
            fg_take = min(fg_share, len(entry.fg_labels)) if with_fg else 0
            bg_want = round(fg_take * bg_per_fg) if with_fg else math.ceil(n_bg / images_per_batch)
            bg_take = min(bg_want, len(entry.bg_boxes))
            fg_pick = rng.choice(len(entry.fg_labels), size=fg_take, replace=False)
            bg_pick = rng.choice(len(entry.bg_boxes), size=bg_take, replace=False)
            boxes = np.concatenate([entry.fg_boxes[fg_pick], entry.bg_boxes[bg_pick]]).reshape(-1, 4)
            image, boxes = image_and_boxes(entry, boxes)
            scale = int(rng.integers(len(scales)))
            features.append(pool_at(image, boxes, np.full(len(boxes), scale, np.int64)).float())
            labels.append(np.concatenate([entry.fg_labels[fg_pick], np.zeros(bg_take, np.int64)]))
        return torch.cat(features), torch.from_numpy(np.concatenate(labels)).to(device)

    return pooler, live_batch
