"""``spp finetune``, its training loop: the optimiser (Caffe's LR and weight-decay multipliers), the LR schedule,
the held-out classification error, the resume point (``resume.pt``) and ``train``, which runs the iterations,
pooling the windows of a chunk of batches at once (cached conv5 maps) or each step's live (``--conv``), in one
process or as one of several torchrun ranks (DistributedDataParallel; see ``train``).
"""
from __future__ import annotations

import contextlib
import logging
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

from ..core.config import FinetuneConfig
from ..core.errors import SppError
from ..core.logs import progress as progress_bar
from ..core.ranks import Ranks, all_sum, barrier, gather_objects, main_decides
from .windows import Entry, Pooler, batch_split, draw_batches, pool_draw, rank_rows

log = logging.getLogger(__name__)
BIAS_LR_MULT = 2.0  # Caffe blobs_lr 1, 2 on every fc layer [S:pascal_finetune_fc_spm_train.prototxt]


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


def classification_error(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                         batch_size: int) -> tuple[float, float]:
    """(error, mean cross-entropy) of ``head`` in eval mode (no dropout) over fixed batches."""
    wrong, loss_sum, count = _classification_sums(head, features, labels, batch_size)
    return wrong / max(1, count), loss_sum / max(1, count)


@torch.no_grad()
def _classification_sums(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                         batch_size: int) -> tuple[int, float, int]:
    """(wrong, summed cross-entropy, windows): what torchrun ranks add up over their shares of the batches."""
    was_training = head.training
    head.eval()
    wrong, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = head(features[start:start + batch_size].float())
        target = labels[start:start + batch_size]
        wrong += int((logits.argmax(1) != target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    head.train(was_training)
    return wrong, loss_sum, len(labels)


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

    def due(self, force: bool = False) -> bool:
        return self.path is not None and (force or time.monotonic() - self.last >= self.every_s)

    def save(self, state: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"key": self.key, **state}, tmp)
        os.replace(tmp, self.path)
        self.last = time.monotonic()

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class _Step(nn.Module):
    """One training step's forward as a module: DistributedDataParallel has to run the forward itself to reduce
    the gradients of ``trained`` (the head, with --conv the backbone too) in the backward pass."""

    def __init__(self, trained: nn.Module):
        super().__init__()
        self.trained = trained

    def forward(self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return compute()


def _rng_streams() -> dict:
    """This rank's torch streams (dropout): the only random state that differs between torchrun ranks."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def train(head: nn.Module, entries: list[Entry], holdout_entries: list[Entry], pooler: Pooler, dim: int,
          ft: FinetuneConfig, seed: int, device: torch.device, *, backbone: nn.Module | None = None,
          live_batch: Callable | None = None, resume_path: Path | None = None, resume_key: str = "",
          chunk_iters: int | None = None, progress: bool = True, ranks: Ranks | None = None) -> TrainResult:
    """Fine-tune ``head`` (and ``backbone`` when given, with ``live_batch(entries, n_fg, n_bg, rng, rank, world)``
    returning one step's pooled features, with gradients, and labels) for ``ft.iters`` iterations; returns the
    best held-out snapshot (keys ``head.*`` and, with a backbone, ``backbone.*``).

    Random streams (all from ``seed``): the held-out draw, the training draws and scales, and torch's (dropout).

    As one of several torchrun ``ranks`` (DistributedDataParallel): every rank makes the same draws from the
    same streams, so the batches are those of one process; rank r pools and trains on rows ``rank_rows`` of
    every cached batch (with --conv: the batch's images r::W), its loss scaled so that DDP's average of the
    ranks' gradients is the gradient of the whole batch's mean. The held-out batches are shared out (r::W) and
    the counts summed, so every rank sees the same error and keeps the same snapshot. Dropout masks come from
    per-rank torch streams (seed + rank). Rank 0 alone writes the resume point, with every rank's torch stream."""
    ranks = ranks or Ranks(device=torch.device(device))
    conv = backbone is not None
    if not any(len(e.fg_labels) + len(e.bg_boxes) for e in entries):
        raise SppError(f"none of the {len(entries)} fine-tuning images has a window with max IoU >= "
                       f"{ft.bg_iou[0]}: check the proposals")
    modules = nn.ModuleDict({"head": head, **({"backbone": backbone} if conv else {})})
    holdout_rng, train_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    torch.manual_seed(seed + ranks.rank)
    optimizer = make_optimizer(head, ft, backbone)
    n_fg, n_bg = batch_split(ft.batch_size, ft.fg_fraction)
    bytes_per_batch = ft.batch_size * dim * 2
    if chunk_iters is None:  # iterations whose windows are pooled at once, within the memory budget
        chunk_iters = 1 if conv else max(1, min(ft.iters, ft.pool_memory_mb * 2**20 // bytes_per_batch))
    # This rank's rows of every training batch (all of them in one process: no mask, the plain pooling).
    lo, hi = rank_rows(ft.batch_size, ranks.rank, ranks.world)
    in_share = (np.arange(ft.batch_size) >= lo) & (np.arange(ft.batch_size) < hi)

    def train_part(n_batches: int) -> np.ndarray | None:
        return np.tile(in_share, n_batches) if ranks.distributed else None

    # Fixed held-out batches (best scale, no flip); pooled once unless the conv layers change. Ranks evaluate
    # whole batches r::W, so each batch is classified as in one process.
    holdout, holdout_part = None, None
    if holdout_entries and ft.holdout_batches > 0:
        holdout_draw = draw_batches(holdout_entries, ft.holdout_batches, ft.batch_size, ft.fg_fraction, holdout_rng)
        if ranks.distributed:
            holdout_part = np.repeat(np.arange(ft.holdout_batches) % ranks.world == ranks.rank, ft.batch_size)
        holdout = holdout_draw if conv else pool_draw(holdout_draw, holdout_entries, pooler, dim, "best",
                                                      holdout_rng, device, holdout_part)

    def evaluate() -> tuple[float | None, float | None]:
        if holdout is None:
            return None, None  # no held-out images (JSON null, not NaN)
        if conv:
            backbone.eval()
            with torch.no_grad():
                feats, labels = pool_draw(holdout, holdout_entries, pooler, dim, "best", holdout_rng, device,
                                          holdout_part)
            backbone.train()
            _freeze_batchnorm(backbone)
        else:
            feats, labels = holdout
        wrong, loss_sum, count = all_sum(list(_classification_sums(head, feats, labels, ft.batch_size)), ranks)
        return wrong / max(1, count), loss_sum / max(1, count)

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
        streams = state.get("rank_rng") or [{"torch": state["torch_rng"], "cuda": state.get("cuda_rng")}]
        if ranks.rank < len(streams):
            torch.set_rng_state(streams[ranks.rank]["torch"])
            if streams[ranks.rank]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(streams[ranks.rank]["cuda"])
        else:  # more ranks than the resume point has streams for: a fresh one, fixed by (seed, rank, iteration)
            torch.manual_seed(seed + ranks.rank + 1000 * start)
    barrier(ranks)  # every rank has read the resume point before rank 0 may overwrite it

    def snapshot_state(rank_streams: list[dict]) -> dict:
        out = {"model": modules.state_dict(), "optimizer": optimizer.state_dict(), "best_state": best_state,
               "best_error": best_error, "best_iter": best_iter, "history": history, "iteration": it,
               "train_loss": train_loss, "train_wrong": train_wrong, "train_seen": train_seen,
               "train_rng": train_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
               "initial_error": initial_error}
        if torch.cuda.is_available():
            out["cuda_rng"] = torch.cuda.get_rng_state()
        if ranks.distributed:
            out["rank_rng"] = rank_streams
        return out

    net: nn.Module = _Step(modules)
    if ranks.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    modules.train()
    if conv:
        _freeze_batchnorm(backbone)
    started, pool_seconds, windows = time.perf_counter(), 0.0, 0
    chunk, chunk_pos = None, 0
    share = hi - lo

    def step_batch() -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of this rank's share of the next batch."""
        nonlocal chunk_pos
        if conv:
            features, labels = live_batch(entries, n_fg, n_bg, train_rng, ranks.rank, ranks.world)
        else:
            features = chunk[0][chunk_pos:chunk_pos + share].float()
            labels = chunk[1][chunk_pos:chunk_pos + share]
            chunk_pos += share
        return head(features), labels

    bar = progress_bar(total=ft.iters, initial=start, desc="finetune", unit="it", mininterval=1.0,
                       dynamic_ncols=True, disable=not progress or not ranks.is_main)  # a terminal, or when asked
    it = start
    try:
        while it < ft.iters:
            if not conv and (chunk is None or chunk_pos == chunk[0].shape[0]):
                tic = time.perf_counter()
                n = min(chunk_iters, ft.iters - it)
                chunk = pool_draw(draw_batches(entries, n, ft.batch_size, ft.fg_fraction, train_rng), entries,
                                  pooler, dim, "random", train_rng, device, train_part(n))
                chunk_pos = 0
                pool_seconds += time.perf_counter() - tic
            set_lr(optimizer, lr_at(ft, it))
            logits, labels = net(step_batch)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            wrong = int((logits.detach().argmax(1) != labels).sum())
            batch_loss, batch_wrong, batch_seen = all_sum([loss_sum.item(), wrong, len(labels)], ranks)
            if not math.isfinite(batch_loss):  # every rank sees the sum, so all stop together
                raise SppError(f"fine-tuning loss became {batch_loss / batch_seen} at iteration {it + 1}; "
                               f"lower finetune.lr (now {ft.lr})")
            # DDP averages the ranks' gradients: this scale makes it the gradient of the whole batch's mean loss
            loss = loss_sum * (ranks.world / batch_seen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            windows += int(batch_seen)
            train_loss += batch_loss
            train_wrong += int(batch_wrong)
            train_seen += int(batch_seen)
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
                    if ranks.is_main:
                        log.info("iteration %d: held-out error %.4f (best)", it, error)
                elif error is not None and ranks.is_main:
                    log.info("iteration %d: held-out error %.4f", it, error)
            # A safe point (no drawn-but-unused windows); rank 0's clock decides for all, since all must gather.
            if (conv or chunk_pos == chunk[0].shape[0]) and main_decides(
                    resume.due(force=ft.checkpoint_every_s <= 0), ranks):
                rank_streams = gather_objects(_rng_streams(), ranks)
                if ranks.is_main:
                    resume.save(snapshot_state(rank_streams))
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
