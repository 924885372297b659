"""``spp bench``, the fc variants side by side: fc6+fc7 in float32, bfloat16 (``detect.fc_dtype``), truncated SVD
and int8 (``detect.fc_compression``, ``core/fccompress.py``) on the same windows, each image's windows SPP-pooled
once at the 1-scale setting. Per variant: fc6+fc7 seconds per image (median over repeats, mean over images), the
speed-up over float32, FLOPs per window, and how far its fc7 features, and the scores that the float32 head's fc8
gives them (a linear classifier, as the SVMs are), are from float32's.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..core import fccompress, nets
from .measure import FlopCounter, PhaseTimer, _Setup
from .spp_mode import spp_window_features

REFERENCE = "float32"
# name -> (detect.fc_compression, detect.fc_dtype); the selected pair is added when it is none of these
VARIANTS: dict[str, tuple[str, str]] = {"float32": ("none", "float32"), "bfloat16": ("none", "bfloat16"),
                                        "svd": ("svd", "float32"), "int8": ("int8", "float32")}


def variant_name(compression: str, fc_dtype: str) -> str:
    """``float32``, ``bfloat16``, ``svd``, ``int8``, ``svd+bfloat16``."""
    if compression == "none":
        return fc_dtype
    return compression if fc_dtype == "float32" else f"{compression}+{fc_dtype}"


def bfloat16_native(device: torch.device) -> bool:
    """Whether the device multiplies bfloat16 in hardware (AVX512-BF16/AMX on a CPU), not by emulation."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fc7(head: nets.SppHead, pooled: torch.Tensor, batch: int) -> torch.Tensor:
    dtype = head.input_dtype
    return torch.cat([head.features(pooled[i:i + batch].to(dtype), "fc7") for i in range(0, len(pooled), batch)])


def _relative(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |diff| / max |reference|, mean |diff| / mean |reference|)."""
    diff = (values.double() - reference.double()).abs()
    ref = reference.double().abs()
    return (float(diff.max() / ref.max()) if ref.max() > 0 else 0.0,
            float(diff.mean() / ref.mean()) if ref.mean() > 0 else 0.0)


def variant_heads(head: nets.SppHead, device: torch.device, svd_ranks, selected: tuple[str, str],
                  selected_head: nets.SppHead) -> tuple[dict, dict]:
    """(name -> head, {"skipped": name -> why, "prepare_seconds": name -> seconds}): each head made once from the
    float32 ``head`` (outside inference mode: quantization converts modules), the selected pair's being
    ``selected_head``."""
    wanted = dict(VARIANTS)
    wanted.setdefault(variant_name(*selected), selected)
    heads, skipped, prepare = {}, {}, {}
    for name, (compression, fc_dtype) in wanted.items():
        if (compression, fc_dtype) == selected:
            heads[name] = selected_head
            continue
        if compression == "int8" and device.type != "cpu":
            skipped[name] = "int8 layers run on the CPU only"
            continue
        started = time.perf_counter()
        heads[name] = (head if name == REFERENCE else
                       fccompress.compress_head(head, compression, svd_ranks, getattr(torch, fc_dtype)))
        prepare[name] = time.perf_counter() - started
    return heads, {"skipped": skipped, "prepare_seconds": prepare}


def compare_fc_variants(setup: _Setup, head: nets.SppHead, heads: dict, made: dict, images, boxes, repeats: int,
                        svd_ranks, selected: tuple[str, str]) -> dict:
    """Time and compare the fc variants ``heads`` (``variant_heads``; float32 ``head`` is the reference) on every
    bench image's windows. Call under ``torch.inference_mode()``."""
    scale = setup.scales["spp_1scale"]
    pooled = [spp_window_features(setup.backbone, head, image, image_boxes, scale, setup.pyramid, setup.rule,
                                  "pool5", memory_format=setup.memory_format)[0]
              for (_image_id, image), image_boxes in zip(images, boxes)]
    batch = max(1, int(setup.fc_batch))
    timer = PhaseTimer(setup.device, setup.clock)
    seconds: dict[str, list[list[float]]] = {name: [[] for _ in pooled] for name in heads}
    features: dict[str, list[torch.Tensor]] = {}
    flops: dict[str, float] = {}
    for name, variant in heads.items():  # warm-up, FLOPs and the features compared
        with FlopCounter({"fc": variant}) as counter:
            features[name] = [_fc7(variant, rows, batch).float() for rows in pooled]
        flops[name] = counter.flops["fc"] / max(1, sum(len(rows) for rows in pooled))
    for _ in range(max(1, repeats)):  # variants interleaved, so that a load change hits them alike
        for k, rows in enumerate(pooled):
            for name, variant in heads.items():
                timer.seconds.clear()
                with timer("fc"):
                    _fc7(variant, rows, batch)
                seconds[name][k].append(timer.seconds["fc"])

    reference = torch.cat(features[REFERENCE])
    fc8 = head.fc8  # the float32 head's classifier scores every variant's fc7
    reference_scores = F.linear(reference, fc8.weight.float(), fc8.bias.float())
    reference_seconds = statistics.mean(statistics.median(s) for s in seconds[REFERENCE])
    variants: dict[str, dict] = {}
    for name in (*heads, *made["skipped"]):
        if name in made["skipped"]:
            variants[name] = {"skipped": made["skipped"][name]}
            continue
        fc7 = torch.cat(features[name])
        scores = F.linear(fc7, fc8.weight.float(), fc8.bias.float())
        fc7_max, fc7_mean = _relative(fc7, reference)
        score_max, score_mean = _relative(scores, reference_scores)
        per_image = statistics.mean(statistics.median(s) for s in seconds[name])
        variants[name] = {
            "seconds": per_image, "speedup": reference_seconds / per_image if per_image > 0 else float("inf"),
            "flops_per_window": flops[name], "fc7_max_rel_diff": fc7_max, "fc7_mean_rel_diff": fc7_mean,
            "score_max_rel_diff": score_max, "score_mean_rel_diff": score_mean,
            "top1_agreement": float((scores.argmax(1) == reference_scores.argmax(1)).double().mean()),
            "prepare_seconds": made["prepare_seconds"].get(name, 0.0), "layers": fccompress.layer_summary(heads[name]),
            "raw_seconds": seconds[name]}
    return {"windows_per_image": float(np.mean([len(rows) for rows in pooled])), "images": len(pooled),
            "scale": scale, "selected": variant_name(*selected), "reference": REFERENCE,
            "svd_ranks": [int(r) for r in svd_ranks], "quantized_engine": torch.backends.quantized.engine,
            "bfloat16_native": bfloat16_native(setup.device), "variants": variants}
