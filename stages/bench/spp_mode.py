"""``spp bench``, the SPP modes (1-scale and 5-scale): ``spp_window_features``, the fast SPP path (conv layers
once per image and scale, each window pooled at its best scale, de-duplicated windows through fc6/fc7 once),
one timed SPP run, and the SPP layer alone (``spp.spp_pool`` against torchvision's ``roi_pool`` per level).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import fcfeatures, nets, rcnn, spp
from .measure import FlopCounter, PhaseTimer, _Setup


@dataclass
class SppPathInfo:
    windows: int = 0
    unique_windows: int = 0  # distinct (scale, conv5 rectangle) pairs: what is pooled and sent through fc
    per_scale: dict[int, int] = field(default_factory=dict)  # unique windows pooled from each scale


def spp_window_features(backbone: nets.Backbone, head: nets.SppHead, image: np.ndarray, boxes, scales: Sequence[int],
                        pyramid: Sequence[int] = spp.DEFAULT_PYRAMID, rule: str = "code", layer: str = "fc7",
                        fc_batch: int = 4096, timer: rcnn.Timer | None = None,
                        memory_format: torch.memory_format = torch.contiguous_format,
                        dedup: bool = True) -> tuple[torch.Tensor, SppPathInfo]:
    """SPP-net features [N, D] float32 of ``boxes`` (original-image coordinates) straight from the image: the conv
    layers once per scale, each window pooled at its best scale (SPEC §2), then ``head.features(.., layer)``.

    Same numbers as ``spp.pool_windows`` + ``head.features`` (tests/test_bench.py checks it); faster because
    windows sharing a (scale, conv5 rectangle) are pooled and run through fc once (``dedup``). Timer phases:
    "conv", "pool", "fc". Call under ``torch.inference_mode()`` with the modules in eval mode.
    """
    phase = timer or rcnn._no_timer
    device = next(backbone.parameters()).device
    spec = backbone.spec
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scales = [int(s) for s in scales]
    pyramid = tuple(int(n) for n in pyramid)
    image_hw = (int(image.shape[0]), int(image.shape[1]))
    info = SppPathInfo(windows=len(boxes))
    with phase("conv"):
        maps = [backbone(nets.preprocess(image, s, spec, device=device)[None]
                         .contiguous(memory_format=memory_format))[0] for s in scales]
    with phase("pool"):
        scale_index, cells = fcfeatures.window_cells(fcfeatures.ImageMaps("", image_hw, tuple(scales), maps, spec),
                                                     boxes, rule)
        keys = np.concatenate([scale_index[:, None], cells], axis=1)
        # Rows sorted by scale (distinct_cells sorts its keys; a stable sort otherwise), so each scale's pooled
        # block is a contiguous slice and one concatenation assembles them; ``inverse`` restores the input order.
        if dedup:
            rows, inverse = spp.distinct_cells(scale_index, cells)
            keys = keys[rows]
        else:
            order = np.argsort(keys[:, 0], kind="stable")
            keys, inverse = keys[order], np.empty_like(order)
            inverse[order] = np.arange(len(order))
        info.unique_windows = len(keys)
        parts = []
        for k in range(len(scales)):
            rows = np.flatnonzero(keys[:, 0] == k)
            info.per_scale[scales[k]] = len(rows)
            if len(rows):
                parts.append(spp.spp_pool(maps[k], torch.from_numpy(keys[rows, 1:]), pyramid).float())
        dim = spp.spp_dim(spec.channels, pyramid)
        pooled = (parts[0] if len(parts) == 1 else torch.cat(parts) if parts
                  else torch.zeros((0, dim), dtype=torch.float32, device=device))
    with phase("fc"):
        if layer == "pool5":
            unique_features = pooled
        else:
            step = max(1, int(fc_batch))
            dtype = head.input_dtype  # a bfloat16 copy of the head takes bfloat16 input
            parts = [head.features(pooled[i:i + step].to(dtype), layer) for i in range(0, len(pooled), step)]
            unique_features = (torch.cat(parts).float() if parts
                               else pooled.new_zeros((0, getattr(head, layer).out_features)))
        features = unique_features.index_select(0, torch.from_numpy(inverse).to(device))
    return features, info


def time_spp(mode: str, setup: _Setup, image: np.ndarray, boxes: np.ndarray, timer: PhaseTimer,
             counter: FlopCounter) -> tuple[dict, float, dict]:
    """SPP mode ``mode`` on one image, inside ``counter``: (seconds per phase, conv FLOPs, what the result adds)."""
    _features, info = spp_window_features(setup.backbone, setup.head, image, boxes, setup.scales[mode],
                                          setup.pyramid, setup.rule, "fc7", setup.fc_batch, timer,
                                          setup.memory_format)
    conv_flops = counter.flops["conv"]
    seconds = dict(timer.seconds)
    return seconds, conv_flops, {"unique_windows": info.unique_windows}


def _pooling_comparison(setup: _Setup, image: np.ndarray, boxes: np.ndarray, repeats: int) -> dict:
    """The SPP layer alone on one 1-scale conv5 map, all windows: ``spp.spp_pool`` (the library's exact pooling)
    against ``spp.spp_pool_naive_per_level`` (torchvision's ``roi_pool`` called once per pyramid level)."""
    backbone, device, pyramid = setup.backbone, setup.device, setup.pyramid
    scale = setup.scales["spp_1scale"][0]
    fmap = backbone(nets.preprocess(image, scale, backbone.spec, device=device)[None]
                    .contiguous(memory_format=setup.memory_format))[0]
    scaled = spp.scale_boxes(boxes, image.shape[:2], scale)
    cells = torch.from_numpy(spp.boxes_to_cells(scaled, tuple(fmap.shape[-2:]), backbone.spec))
    timer = PhaseTimer(device, setup.clock)
    results = {}
    for name, pool in (("spp_pool", spp.spp_pool), ("roi_pool_per_level", spp.spp_pool_naive_per_level)):
        pool(fmap, cells, pyramid)  # warm-up
        seconds = []
        for _ in range(max(1, repeats)):
            timer.seconds.clear()
            with timer(name):
                out = pool(fmap, cells, pyramid)
            seconds.append(timer.seconds[name])
        results[name] = (statistics.median(seconds), out)
    fast, naive = results["spp_pool"], results["roi_pool_per_level"]
    return {"windows": len(boxes), "scale": scale, "map_hw": list(fmap.shape[-2:]),
            "spp_pool_seconds": fast[0], "roi_pool_per_level_seconds": naive[0],
            "speedup": naive[0] / fast[0] if fast[0] > 0 else float("inf"),
            "max_abs_difference": float((fast[1] - naive[1]).abs().max()) if len(boxes) else 0.0}
