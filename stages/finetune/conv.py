"""``spp finetune --conv``: the poolers that run the backbone on the image itself, so that gradients reach the
conv layers through the SPP layer (``spp.pool_windows`` max-pools like RoI pooling). ``_live_poolers`` gives
the held-out pooler (a ``windows.Pooler``) and the training batch maker that ``training.train`` calls each step
(a torchrun rank runs the backbone on its share of the step's images only).

With ``finetune.conv_frozen_layers = N`` the trunk's first N body layers stay frozen: their output for an image
(mirrored or not) at a scale never changes, so ``FrozenMemo`` computes it once and keeps it, which leaves each step
only the trainable layers to run forward and backward (on a CPU most of the cost of ``--conv``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..core.boxes import flip_boxes
from ..core.errors import SppError
from ..core.voc import VocDataset
from .windows import Entry


class FrozenMemo:
    """The frozen layers' output per key (image, mirror, scale), computed once without gradients and kept while
    the total stays within ``budget_mb`` (least recently used dropped first; 0 keeps nothing). The frozen layers
    never change, so a kept map is exactly what recomputing it would give."""

    def __init__(self, budget_mb: float):
        self.budget = int(budget_mb * 2**20)
        self.maps: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.maps:
            self.hits += 1
            self.maps.move_to_end(key)
            return self.maps[key]
        self.misses += 1
        with torch.no_grad():
            value = compute()
        size = value.numel() * value.element_size()
        if size <= self.budget:
            while self.bytes + size > self.budget:
                _, dropped = self.maps.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()
            self.maps[key] = value
            self.bytes += size
        return value


def split_trunk(body: nn.Sequential, frozen_layers: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen first ``frozen_layers`` layers, with gradients off; the trainable rest)."""
    if not 0 <= frozen_layers < len(body):
        raise SppError(f"finetune.conv_frozen_layers = {frozen_layers}, but the trunk has {len(body)} layers: "
                       f"at most {len(body) - 1} can stay frozen with --conv")
    frozen, trainable = body[:frozen_layers], body[frozen_layers:]
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen, trainable


def _live_poolers(model: nn.Module, dataset: VocDataset, spec, scales: tuple[int, ...], pyramid: tuple[int, ...],
                  rule: str, device: torch.device, images_per_batch: int = 2, frozen_layers: int = 0,
                  memo_mb: float = 0.0):
    """--conv: (held-out pooler, training batch maker), both running the backbone on the image itself (its first
    ``frozen_layers`` layers once per image, mirror and scale when ``memo_mb`` holds their output)."""
    from ..core import nets, spp

    frozen, trainable = split_trunk(model.backbone.body, frozen_layers)
    memo = FrozenMemo(memo_mb if frozen_layers else 0)

    def conv5(entry: Entry, scale: int) -> torch.Tensor:
        def frozen_output() -> torch.Tensor:
            image = dataset.load_image(entry.image_id)
            if entry.flip:
                image = np.ascontiguousarray(image[:, ::-1])
            return frozen(nets.preprocess(image, scale, spec, device=device)[None])
        return trainable(memo.get((entry.image_id, entry.flip, scale), frozen_output))[0]

    def pool_at(entry: Entry, boxes: np.ndarray, scale_index: np.ndarray) -> torch.Tensor:
        """Pool ``boxes`` (original image coordinates) of ``entry`` (mirrored when it says so)."""
        if entry.flip:
            boxes = flip_boxes(boxes, entry.width)
        used = np.unique(scale_index)
        maps = [conv5(entry, scales[u]) for u in used]
        return spp.pool_windows(maps, (entry.height, entry.width), [scales[u] for u in used], boxes, spec, pyramid,
                                scale_index=np.searchsorted(used, scale_index), rule=rule)

    def pooler(entry: Entry, boxes: np.ndarray, scale_choice: str, rng: np.random.Generator,
               keep: np.ndarray | None = None) -> torch.Tensor:
        if scale_choice == "best":
            index = np.asarray(spp.choose_scale(boxes, (entry.height, entry.width), scales, rule=rule),
                               dtype=np.int64).reshape(-1)
        else:
            index = rng.integers(len(scales), size=len(boxes))
        if keep is not None:  # a torchrun rank's share: the scales were drawn for every window
            boxes, index = boxes[keep], index[keep]
            if not len(boxes):
                return torch.zeros((0, spp.spp_dim(spec.channels, pyramid)), device=device)
        return pool_at(entry, boxes, index)

    def live_batch(entries: list[Entry], n_fg: int, n_bg: int, rng: np.random.Generator, rank: int = 0,
                   world: int = 1):
        """Windows of ``images_per_batch`` random images (or mirrors), each at one random scale. Each image gives
        up to its share of the ``n_fg`` foreground windows and ``n_bg / n_fg`` background windows per foreground
        one, so the batch keeps the cached path's foreground fraction even when an image has only a few
        foreground windows (filling up with background instead taught the net to call everything background).

        torchrun rank ``rank`` of ``world`` runs the backbone on the batch's images ``rank::world`` only and
        returns their windows; every rank makes all the draws, so the batch is the one a single process draws."""
        with_fg = [e for e in entries if len(e.fg_labels)] if n_fg else []
        pool = with_fg or [e for e in entries if len(e.bg_boxes)]
        if not pool:
            raise SppError("no training image has a foreground or background window to fine-tune on")
        fg_share = math.ceil(n_fg / images_per_batch)
        bg_per_fg = n_bg / n_fg if n_fg else 0.0
        features, labels = [], []
        for k in range(images_per_batch):
            entry = pool[int(rng.integers(len(pool)))]
            fg_take = min(fg_share, len(entry.fg_labels)) if with_fg else 0
            bg_want = round(fg_take * bg_per_fg) if with_fg else math.ceil(n_bg / images_per_batch)
            bg_take = min(bg_want, len(entry.bg_boxes))
            fg_pick = rng.choice(len(entry.fg_labels), size=fg_take, replace=False)
            bg_pick = rng.choice(len(entry.bg_boxes), size=bg_take, replace=False)
            boxes = np.concatenate([entry.fg_boxes[fg_pick], entry.bg_boxes[bg_pick]]).reshape(-1, 4)
            scale = int(rng.integers(len(scales)))
            if k % world != rank:
                continue  # another rank's image
            features.append(pool_at(entry, boxes, np.full(len(boxes), scale, np.int64)).float())
            labels.append(np.concatenate([entry.fg_labels[fg_pick], np.zeros(bg_take, np.int64)]))
        return torch.cat(features), torch.from_numpy(np.concatenate(labels)).to(device)

    live_batch.memo = memo  # its hit counts go into the stage's metrics
    return pooler, live_batch
