"""``spp finetune --conv``: the poolers that run the backbone on the image itself, so that gradients reach the
conv layers through the SPP layer (``spp.pool_windows`` max-pools like RoI pooling). ``_live_poolers`` gives
the held-out pooler (a ``windows.Pooler``) and the training batch maker that ``training.train`` calls each step.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..core.boxes import flip_boxes
from ..core.errors import SppError
from ..core.voc import VocDataset
from .windows import Entry


def _live_poolers(model: nn.Module, dataset: VocDataset, spec, scales: tuple[int, ...], pyramid: tuple[int, ...],
                  rule: str, device: torch.device, images_per_batch: int = 2):
    """--conv: (held-out pooler, training batch maker), both running the backbone on the image itself."""
    from ..core import nets, spp

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
