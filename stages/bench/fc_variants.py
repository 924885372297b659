"""``spp bench``, the fc variants side by side: fc6+fc7 in float32, bfloat16 (``detect.fc_dtype``), truncated SVD
and int8 (``detect.fc_compression``, ``core/fccompress.py``). Every mode times every variant on its own rows in
the same run (``measure.time_fc``: R-CNN's every window, SPP's distinct windows), so that each variant has its
SPP and R-CNN totals and their ratio with one and the same fc path in both modes, and its fc rate against the
GEMM peak of its own type (``measure.matmul_peak``). An int8 head that takes uint8 rows (``Int8SppHead``) gets
them pooled straight into uint8 in the SPP modes, that pooling timed for it alone. Per variant also: the speed-up over float32, FLOPs per
window, and how far its fc7 features, and the scores that the float32 head's fc8 gives them (a linear
classifier, as the SVMs are), are from float32's, on each image's windows pooled at the 1-scale setting.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..core import fccompress, fcfeatures, nets
from .measure import FlopCounter, _Setup, peak_dtype
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


def _relative(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |diff| / max |reference|, mean |diff| / mean |reference|)."""
    diff = (values.double() - reference.double()).abs()
    ref = reference.double().abs()
    return (float(diff.max() / ref.max()) if ref.max() > 0 else 0.0,
            float(diff.mean() / ref.mean()) if ref.mean() > 0 else 0.0)


def variant_heads(head: nets.SppHead, device: torch.device, svd_ranks, selected: tuple[str, str],
                  selected_head: nets.SppHead) -> tuple[dict, dict]:
    """(name -> head, {"skipped": name -> why, "prepare_seconds": name -> seconds, "pairs": name ->
    (compression, fc dtype) of each head made}): each head made once from the float32 ``head`` (outside inference
    mode: quantization converts modules), the selected pair's being ``selected_head``."""
    wanted = dict(VARIANTS)
    wanted.setdefault(variant_name(*selected), selected)
    heads, skipped, prepare, pairs = {}, {}, {}, {}
    for name, (compression, fc_dtype) in wanted.items():
        if (compression, fc_dtype) == selected:
            heads[name], pairs[name] = selected_head, selected
            continue
        if compression == "int8" and device.type != "cpu":
            skipped[name] = "int8 layers run on the CPU only"
            continue
        started = time.perf_counter()
        heads[name] = (head if name == REFERENCE else
                       fccompress.compress_head(head, compression, svd_ranks, getattr(torch, fc_dtype)))
        prepare[name], pairs[name] = time.perf_counter() - started, (compression, fc_dtype)
    return heads, {"skipped": skipped, "prepare_seconds": prepare, "pairs": pairs}


def variant_speeds(modes: dict, peaks: dict, pairs: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """Per fc variant, from the modes' aggregated runs (``modes[mode]["fc_variants"][name]``: the variant's fc
    timed in that mode, conv shared, pooling shared but for an int8 head's uint8 rows, ``measure.time_fc``): each
    mode's pool, fc and total seconds and fc rate, the speed-ups
    over R-CNN mode with this same fc path, and the fc rate as a fraction of the GEMM peak of the variant's own
    type (``peaks[peak_dtype]``; None where that peak was not measured)."""
    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else float("inf")

    speeds = {}
    for name, pair in pairs.items():
        per_mode = {mode: dict(data["fc_variants"][name]) for mode, data in modes.items()}
        dtype = peak_dtype(*pair)
        peak = (peaks.get(dtype) or {}).get("gflops")
        held = ((peaks.get(dtype) or {}).get("sustained") or {}).get("gflops")
        for mode, data in per_mode.items():
            data["fraction_of_peak"] = data["fc_gflops_per_s"] / peak if peak else None
            data["fraction_of_sustained"] = data["fc_gflops_per_s"] / held if held else None
        rcnn, conv = per_mode["rcnn"]["total_seconds"], {mode: modes[mode]["seconds"]["conv"] for mode in modes}
        speeds[name] = {
            "modes": per_mode, "peak_dtype": dtype, "peak_gflops": peak,
            "fc_fraction_of_peak": per_mode["spp_1scale"]["fraction_of_peak"],
            "sustained_gflops": held, "fc_fraction_of_sustained": per_mode["spp_1scale"]["fraction_of_sustained"],
            "speedup_total_1scale": ratio(rcnn, per_mode["spp_1scale"]["total_seconds"]),
            "speedup_total_5scale": ratio(rcnn, per_mode["spp_5scale"]["total_seconds"]),
            "speedup_conv_1scale": ratio(conv["rcnn"], conv["spp_1scale"]),
            "speedup_conv_5scale": ratio(conv["rcnn"], conv["spp_5scale"])}
    return speeds


def compare_fc_variants(setup: _Setup, head: nets.SppHead, heads: dict, made: dict, images, boxes, svd_ranks,
                        selected: tuple[str, str], speeds: dict[str, dict], raw_seconds: dict[str, list]) -> dict:
    """The fc variants ``heads`` (``variant_heads``; float32 ``head`` is the reference) side by side: their speed
    in every mode (``speeds``, from ``variant_speeds``; ``raw_seconds``: SPP 1-scale fc seconds [image][repeat])
    and how far their fc7 features and fc8 scores are from float32's on every bench image's windows pooled at the
    1-scale setting. Call under ``torch.inference_mode()``."""
    scale = setup.scales["spp_1scale"]
    pooled, maps = [], []
    for (_image_id, image), image_boxes in zip(images, boxes):
        rows, info = spp_window_features(setup.backbone, head, image, image_boxes, scale, setup.pyramid, setup.rule,
                                         "pool5", memory_format=setup.memory_format)
        pooled.append(rows)
        maps.append(info.maps)
    features: dict[str, torch.Tensor] = {}
    flops: dict[str, float] = {}
    for name, variant in heads.items():
        # each variant's own input: an int8 head's uint8 rows quantized as detect quantizes them (the maps' range)
        inputs = [fcfeatures.quantized_rows(image_maps, rows) if variant.input_dtype == torch.uint8 else rows
                  for rows, image_maps in zip(pooled, maps)]
        with FlopCounter({"fc": variant}) as counter:
            features[name] = torch.cat([fcfeatures.head_rows(variant, rows, "fc7", setup.fc_batch) for rows in inputs])
        flops[name] = counter.flops["fc"] / max(1, sum(len(rows) for rows in pooled))

    reference = features[REFERENCE]
    fc8 = head.fc8  # the float32 head's classifier scores every variant's fc7
    reference_scores = F.linear(reference, fc8.weight.float(), fc8.bias.float())
    reference_seconds = speeds[REFERENCE]["modes"]["spp_1scale"]["fc_seconds"]
    variants: dict[str, dict] = {}
    for name in (*heads, *made["skipped"]):
        if name in made["skipped"]:
            variants[name] = {"skipped": made["skipped"][name]}
            continue
        scores = F.linear(features[name], fc8.weight.float(), fc8.bias.float())
        fc7_max, fc7_mean = _relative(features[name], reference)
        score_max, score_mean = _relative(scores, reference_scores)
        seconds = speeds[name]["modes"]["spp_1scale"]["fc_seconds"]
        variants[name] = {
            "seconds": seconds, "speedup": reference_seconds / seconds if seconds > 0 else float("inf"),
            **speeds[name],
            "flops_per_window": flops[name], "fc7_max_rel_diff": fc7_max, "fc7_mean_rel_diff": fc7_mean,
            "score_max_rel_diff": score_max, "score_mean_rel_diff": score_mean,
            "top1_agreement": float((scores.argmax(1) == reference_scores.argmax(1)).double().mean()),
            "prepare_seconds": made["prepare_seconds"].get(name, 0.0), "layers": fccompress.layer_summary(heads[name]),
            "raw_seconds": raw_seconds[name]}
    return {"windows_per_image": float(np.mean([len(rows) for rows in pooled])), "images": len(pooled),
            "scale": scale, "selected": variant_name(*selected), "reference": REFERENCE,
            "svd_ranks": [int(r) for r in svd_ranks], "quantized_engine": fccompress.int8_engine(),
            "bfloat16_native": bfloat16_native(setup.device), "variants": variants}
