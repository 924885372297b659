"""``spp finetune`` without ``--conv``: the conv layers stay frozen, so windows are pooled from the conv5 maps of
the training split cached by ``spp extract-features``. ``cached_pooler`` checks that the cache fits the model and
the region database and returns the ``windows.Pooler`` that pools a window at its scale from the HDF5 cache.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..core.artifacts import Manifest, Run
from ..core.config import Config
from ..core.errors import SppError
from ..core.registry import command_for_path
from ..core.roidb import ImageRois
from .windows import Entry, Pooler


def cached_pooler(cfg: Config, run_dir: Run, features: Manifest, roidb: list[ImageRois], pre_meta: dict, spec,
                  pyramid: tuple[int, ...], device: torch.device) -> tuple[Pooler, bool]:
    """(pooler over the training split's conv5 cache, whether mirrored windows are used). ``features`` is the
    cache's manifest; the cache must come from the pretrained model's backbone and hold every image of ``roidb``."""
    from ..core.features import features_for

    ft = cfg.finetune
    split = cfg.data.train_split
    cache = features_for(run_dir, split)
    cache_file = features.folder
    if cache.backbone != pre_meta.get("backbone", cfg.model.backbone):
        raise SppError(f"the conv5 cache was made with backbone {cache.backbone!r} but the pretrained model is "
                       f"{pre_meta.get('backbone')!r}; rerun `{command_for_path(cache_file / 'x')}`", cache_file)
    if cache.spec.channels != spec.channels:
        raise SppError(f"the conv5 cache has {cache.spec.channels} channels, the model {spec.channels}",
                       cache_file)
    missing = [r.image_id for r in roidb if r.image_id not in cache]
    if missing:
        raise SppError(f"the conv5 cache lacks {len(missing)} image(s) of split {split!r} (e.g. {missing[0]!r}); "
                       f"rerun `{command_for_path(cache_file / 'x')}`", cache_file)
    flip_used = ft.flip and cache.has_flip
    if ft.flip and not cache.has_flip:
        warnings.warn(f"{cache_file}: the conv5 cache holds no mirrored maps; fine-tuning without flips "
                      "(set features.flip = true and rerun extract-features to train on flips)", stacklevel=3)
    rule = cfg.features.scale_rule

    def pooler(entry: Entry, boxes: np.ndarray, scale_choice: str, rng: np.random.Generator,
               keep: np.ndarray | None = None) -> torch.Tensor:
        if keep is not None:  # a torchrun rank's share: scales drawn for every window, only the kept ones pooled
            _, index = cache.scale_indices(entry.image_id, boxes, scale_choice, rng, rule=rule)
            boxes, scale_choice = boxes[keep], index[keep]
        return cache.pooled(entry.image_id, boxes, pyramid, scale_choice=scale_choice, rng=rng,
                            flip=entry.flip, device=device, rule=rule)

    return pooler, flip_used
