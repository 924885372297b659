"""``spp pretrain``, its training: the network to train (fresh, or from ``pretrain.init``), the optimiser and
the LR schedule, one epoch, the validation pass, the per-epoch resume checkpoint and the non-finite checks.
"""
from __future__ import annotations

import bisect
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core import nets
from ..core.artifacts import atomic_write_bytes
from ..core.config import CHOICES, Config
from ..core.errors import SppError
from ..core.logs import progress
from ..core.ranks import Ranks, all_sum
from .data import _unwrap_worker_error

log = logging.getLogger(__name__)
RESUME_FORMAT = "sppnet-pretrain-resume/1"
OPTIMIZERS = CHOICES["pretrain.optimizer"]
# fc8 width when there is no classification data to size it (epochs = 0 from an ImageNet trunk): ImageNet's
# 1000 [SPEC §1]. Fine-tuning replaces fc8 anyway.
UNTRAINED_FC8_CLASSES = 1000


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


def epoch_lr(base_lr: float, lr_steps: tuple[int, ...], epoch: int) -> float:
    """Base LR divided by 10 at each step: epochs ``lr_steps[i]`` (0-based) onwards use ``base / 10**(i+1)``."""
    return base_lr * 0.1 ** bisect.bisect_right(sorted(lr_steps), epoch)


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
        log.warning("pretrain: ignoring unreadable %s (%s); starting from scratch", path, type(exc).__name__)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("pretrain: ignoring %s (not a pretrain checkpoint); starting from scratch", path)
        return None
    if state.get("resume_key") != resume_key:
        log.warning("pretrain: %s was made with another config or data; starting from scratch", path)
        return None
    if state["epoch"] > epochs:
        log.warning("pretrain: %s is at epoch %d, past the requested %d; starting from scratch", path,
                    state["epoch"], epochs)
        return None
    return state


def _check_finite_weights(model: nn.Module, epoch: int, kept: str) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise SppError(f"non-finite weights ({name}) after epoch {epoch}; {kept}; lower pretrain.lr")


# -- training -----------------------------------------------------------------------------------------------------
def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, ranks: Ranks,
                 epoch: int, epochs: int, size: int, kept: str) -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over all ranks. Stops on a non-finite loss before stepping."""
    model.train()
    loss_sum = correct = seen = 0.0
    bar = progress(loader, desc=f"pretrain epoch {epoch}/{epochs} @{size}px", disable=not ranks.is_main,
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
        step = all_sum([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)], ranks)
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
def evaluate(model: nn.Module, loader: DataLoader, ranks: Ranks) -> tuple[float, float]:
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
    loss_sum, correct, seen = all_sum([loss_sum, correct, seen], ranks)
    return loss_sum / max(seen, 1), correct / max(seen, 1)
