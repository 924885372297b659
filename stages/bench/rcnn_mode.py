"""``spp bench``, R-CNN mode (``core/rcnn.py``): every window cropped with context, warped to the net's input
size and run through the conv layers. Its conv and pool cost is exactly linear in the number of windows, so
``time_rcnn`` times them on evenly spaced windows and scales them to all; fc runs on as many rows as windows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import rcnn
from .measure import FlopCounter, PhaseTimer, _Setup, time_fc


def _even_subset(count: int, keep: int) -> np.ndarray:
    """``keep`` evenly spaced indices of ``range(count)``."""
    keep = max(1, min(count, keep))
    return np.floor(np.arange(keep) * (count / keep)).astype(np.int64)


def time_rcnn(setup: _Setup, image: np.ndarray, boxes: np.ndarray, keep: int, timer: PhaseTimer,
              counter: FlopCounter, turn: int = 0) -> tuple[dict, float, dict]:
    """R-CNN mode on one image, inside ``counter``, conv and pool timed on ``keep`` of the windows: (seconds per
    phase and conv FLOPs, both scaled to all windows, and what the result adds). fc runs every fc variant on as
    many rows as windows (``time_fc``, the same fc path as the SPP modes)."""
    backbone = setup.backbone
    subset = boxes[_even_subset(len(boxes), keep)]
    pooled = rcnn.rcnn_window_pooled(backbone, image, subset, backbone.spec, setup.pyramid, setup.rcnn_input,
                                     batch=setup.rcnn_batch, timer=timer, memory_format=setup.memory_format)
    factor = len(boxes) / len(subset)
    conv_flops = counter.flops["conv"] * factor
    # fc on as many rows as there are windows: the same GEMMs the full R-CNN run would do.
    rows = pooled.index_select(0, torch.arange(len(boxes), device=pooled.device) % len(subset))
    time_fc(setup, rows, timer, turn)
    seconds = {phase: value * factor if phase in ("conv", "pool") or phase.startswith("pool:") else value
               for phase, value in timer.seconds.items()}
    return seconds, conv_flops, {"timed_windows": len(subset), "scale_factor": factor}
