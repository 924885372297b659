"""``spp bench``, the SPP modes (1-scale and 5-scale): ``spp_pooled_windows`` (conv layers once per image and
scale, each distinct window pooled at its best scale, with detect's own functions), ``spp_window_features`` (then
fc6/fc7), one timed SPP run, and the SPP layer alone (``spp.spp_pool`` against torchvision's ``roi_pool`` per
level).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import fcfeatures, nets, rcnn, spp
from ..core.quant import QuantizedRows
from .measure import FlopCounter, PhaseTimer, _Setup, time_fc


@dataclass
class SppPathInfo:
    windows: int = 0
    unique_windows: int = 0  # distinct (scale, conv5 rectangle) pairs: what is pooled and sent through fc
    per_scale: dict[int, int] = field(default_factory=dict)  # unique windows pooled from each scale
    maps: fcfeatures.ImageMaps | None = None  # the conv5 maps the windows were pooled from


def pool_image_windows(image_maps: fcfeatures.ImageMaps, boxes: np.ndarray, pyramid: Sequence[int],
                       rule: str = "code", dedup: bool = True, quantized: bool = False
                       ) -> tuple[torch.Tensor | QuantizedRows, np.ndarray, SppPathInfo]:
    """``(pooled, inverse, info)`` of ``boxes`` on one image's conv5 maps: each window at its best scale, windows
    sharing a (scale, conv5 rectangle) once (``dedup``), with detect's functions (``fcfeatures.distinct_windows``,
    ``fcfeatures.pool_windows``); ``quantized``: uint8 rows, as an int8 head takes them."""
    scales = image_maps.scales
    if dedup:
        distinct = fcfeatures.distinct_windows(image_maps, boxes, rule)
        rows, scale_index, inverse = distinct.rows, distinct.scale_index, distinct.inverse
    else:  # rows sorted by scale, as distinct_windows sorts them: each scale's block is pooled in place
        scale_index = spp.choose_scale(boxes, image_maps.image_hw, scales, rule)
        rows = np.argsort(scale_index, kind="stable")
        scale_index = scale_index[rows]
        inverse = np.empty_like(rows)
        inverse[rows] = np.arange(len(rows))
    pooled = fcfeatures.pool_windows(image_maps, boxes[rows], pyramid, scale_index=scale_index, rule=rule,
                                     quantized=quantized)
    info = SppPathInfo(windows=len(boxes), unique_windows=len(rows),
                       per_scale={s: int(np.count_nonzero(scale_index == k)) for k, s in enumerate(scales)},
                       maps=image_maps)
    return pooled, inverse, info


def spp_pooled_windows(backbone: nets.Backbone, image: np.ndarray, boxes, scales: Sequence[int],
                       pyramid: Sequence[int] = spp.DEFAULT_PYRAMID, rule: str = "code",
                       timer: rcnn.Timer | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                       dedup: bool = True, quantized: bool = False
                       ) -> tuple[torch.Tensor | QuantizedRows, np.ndarray, SppPathInfo]:
    """``(pooled, inverse, info)``: pool5 [U, D] float32 (``quantized``: uint8 ``QuantizedRows``) of the distinct
    windows of ``boxes`` (original-image coordinates) straight from the image, and ``inverse`` [N], each window's
    row in it. The conv layers run once per scale; then ``pool_image_windows``, with the functions detect pools
    with, so the two compute the same numbers at the same cost. Timer phases "conv" and "pool". Call under
    ``torch.inference_mode()``, the backbone in eval mode.
    """
    phase = timer or rcnn._no_timer
    device = next(backbone.parameters()).device
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scales = tuple(int(s) for s in scales)
    image_hw = (int(image.shape[0]), int(image.shape[1]))
    with phase("conv"):
        maps = [nets.conv5_maps(backbone, nets.preprocess(image, s, backbone.spec, device=device)[None],
                                memory_format)[0] for s in scales]
    with phase("pool"):
        image_maps = fcfeatures.ImageMaps("", image_hw, scales, maps, backbone.spec)
        return pool_image_windows(image_maps, boxes, tuple(int(n) for n in pyramid), rule, dedup, quantized)


def spp_window_features(backbone: nets.Backbone, head: nets.SppHead, image: np.ndarray, boxes, scales: Sequence[int],
                        pyramid: Sequence[int] = spp.DEFAULT_PYRAMID, rule: str = "code", layer: str = "fc7",
                        fc_batch: int = 4096, timer: rcnn.Timer | None = None,
                        memory_format: torch.memory_format = torch.contiguous_format,
                        dedup: bool = True) -> tuple[torch.Tensor, SppPathInfo]:
    """SPP-net features [N, D] float32 of ``boxes`` (original-image coordinates) straight from the image:
    ``spp_pooled_windows``, then ``head.features(.., layer)`` of each distinct window through detect's fc path
    (``fcfeatures.head_rows``), each window taking its row. Timer phases "conv", "pool", "fc".

    Same numbers as ``spp.pool_windows`` + ``head.features`` (tests/test_bench.py checks it); faster because
    windows sharing a (scale, conv5 rectangle) are pooled and run through fc once (``dedup``). Call under
    ``torch.inference_mode()`` with the modules in eval mode.
    """
    phase = timer or rcnn._no_timer
    quantized = layer != "pool5" and head.input_dtype == torch.uint8  # an int8 head: uint8 rows, as detect pools
    pooled, inverse, info = spp_pooled_windows(backbone, image, boxes, scales, pyramid, rule, timer, memory_format,
                                               dedup, quantized)
    with phase("fc"):
        unique_features = pooled if layer == "pool5" else fcfeatures.head_rows(head, pooled, layer, fc_batch)
        features = unique_features.index_select(0, torch.from_numpy(inverse).to(unique_features.device))
    return features, info


def time_spp(mode: str, setup: _Setup, image: np.ndarray, boxes: np.ndarray, timer: PhaseTimer,
             counter: FlopCounter, turn: int = 0) -> tuple[dict, float, dict]:
    """SPP mode ``mode`` on one image, inside ``counter``: (seconds per phase, conv FLOPs, what the result adds).
    fc runs every fc variant on the distinct windows (``time_fc``), as detect scores them: a window that shares
    its twin's row takes its scores afterwards, so copying fc7 rows to every window is not counted.

    Pooling is timed per kind of rows the variants take: float32 rows (phase "pool:float32") and, when a variant
    is an int8 head, uint8 rows pooled straight from the quantized maps ("pool:uint8"); "pool" is the selected
    variant's."""
    pooled, _inverse, info = spp_pooled_windows(setup.backbone, image, boxes, setup.scales[mode], setup.pyramid,
                                                setup.rule, timer, setup.memory_format)
    rows = {"float32": pooled}
    timer.seconds["pool:float32"] = timer.seconds["pool"]
    if any(head.input_dtype == torch.uint8 for head in setup.fc_heads().values()):
        with timer("pool:uint8"):
            rows["uint8"] = pool_image_windows(info.maps, boxes, setup.pyramid, setup.rule, quantized=True)[0]
    conv_flops = counter.flops["conv"]
    time_fc(setup, rows, timer, turn)
    return dict(timer.seconds), conv_flops, {"unique_windows": info.unique_windows}


def _pooling_comparison(setup: _Setup, image: np.ndarray, boxes: np.ndarray, repeats: int) -> dict:
    """The SPP layer alone on one 1-scale conv5 map, all windows: ``spp.spp_pool`` (the library's exact pooling)
    against ``spp.spp_pool_naive_per_level`` (torchvision's ``roi_pool`` called once per pyramid level)."""
    backbone, device, pyramid = setup.backbone, setup.device, setup.pyramid
    scale = setup.scales["spp_1scale"][0]
    fmap = nets.conv5_maps(backbone, nets.preprocess(image, scale, backbone.spec, device=device)[None],
                           setup.memory_format)[0]
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
