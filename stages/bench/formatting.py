"""``spp bench``, its report: the machine it ran on, the per-phase table of the three modes, the speed-ups and
FLOP ratios, the fc rate against the matmul peak, the SPP layer alone, and the paper's Table 10 beside them.
"""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from .measure import MODE_NAMES, MODES

# SPP-net Table 10 [P §4.3; SPEC §8]: Caffe, GPU, ZF-5 for both, average over 100 VOC07 images, seconds/image.
PAPER_TABLE10 = {"rcnn_conv_s": 14.37, "spp_1scale_conv_s": 0.053, "spp_5scale_conv_s": 0.293, "spp_fc_s": 0.089,
                 "speedup_conv_1scale": 270, "speedup_conv_5scale": 49, "speedup_total_1scale": 102,
                 "speedup_total_5scale": 38}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({_cpu_model()}, {len(os.sched_getaffinity(0))} cores)"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")


def format_report(results: dict) -> str:
    """The human-readable table of a ``run`` result."""
    modes = results["modes"]
    load = results["load_average_before"][0], results["load_average_after"][0]
    rcnn_info = modes["rcnn"]
    lines = [
        f"SPP-net vs R-CNN speed: backbone {results['backbone']}, device {results['device']}, "
        f"{results['threads']} threads, {results['clock']} clock, load average {load[0]:.2f} before / "
        f"{load[1]:.2f} after{_heap_note(results['malloc_kept_bytes'])}",
        f"weights: {results['weights']}",
        f"images: {results['images']}",
        f"windows: {results['proposals']}",
        f"SPP scales: 1-scale {results['scales_1scale']}, 5-scale {results['scales_5scale']}; pyramid "
        f"{results['pyramid']}; fc6/fc7 width {results['fc_dim']} in {results['fc_dtype']}"
        f"{_compression_note(results)}; channels-last convs "
        f"{results['channels_last']}; TF32 {results['cuda_tf32']}",
        f"R-CNN: {results['rcnn_input_size']}x{results['rcnn_input_size']} warp, {results['rcnn_context']} px "
        f"context; conv+pool timed on {results['rcnn_windows_timed']} of {results['windows']} windows/image and "
        f"scaled x{rcnn_info.get('scale_factor', 1.0):.2f} (its cost is exactly linear in windows); fc timed on all",
        f"seconds per image (median of {results['repeats']} repeats after warm-up, mean over images):",
        "",
        f"{'mode':<13}{'conv':>10}{'pool':>9}{'fc':>9}{'total':>10}{'conv GFLOP':>12}{'conv GF/s':>11}"
        f"{'fc GFLOP':>10}{'fc GF/s':>9}{'fc rows':>9}",
    ]
    for mode in MODES:
        data = modes[mode]
        s, f, rate = data["seconds"], data["flops"], data["gflops_per_s"]
        rows = data.get("unique_windows", data.get("windows", results["windows"]))
        lines.append(f"{MODE_NAMES[mode]:<13}{s['conv']:>10.3f}{s['pool']:>9.3f}{s['fc']:>9.3f}{s['total']:>10.3f}"
                     f"{f['conv'] / 1e9:>12.1f}{rate['conv']:>11.1f}{f['fc'] / 1e9:>10.1f}{rate['fc']:>9.1f}"
                     f"{rows:>9.0f}")
    paper = results["paper_table10"]
    pooling = results["pooling"]
    lines += [
        "",
        f"speed-up vs R-CNN: 1-scale total {results['speedup_total_1scale']:.1f}x, conv "
        f"{results['speedup_conv_1scale']:.1f}x (conv FLOP ratio {results['flop_ratio_conv_1scale']:.1f}); 5-scale "
        f"total {results['speedup_total_5scale']:.1f}x, conv {results['speedup_conv_5scale']:.1f}x (FLOP ratio "
        f"{results['flop_ratio_conv_5scale']:.1f})",
        f"GEMM peaks (best call of each GEMM after warm-up, {results['threads']} threads, before and after the timed "
        f"runs; fc6/fc7 shapes and a square one): "
        + "; ".join(_peak_text(peak) for peak in results["matmul_peaks"].values()),
        f"SPP 1-scale fc6+fc7 ({results.get('fc_variants', {}).get('selected', results['fc_dtype'])}): "
        f"{modes['spp_1scale']['gflops_per_s']['fc']:.1f} GFLOP/s = {_percent(results['fc_fraction_of_matmul_peak'])}"
        f" of the {results['matmul']['dtype']} peak"
        + (f", {_percent(results['fc_fraction_of_sustained'])} of the rate it holds"
           if results.get("fc_fraction_of_sustained") is not None else ""),
        f"SPP layer alone ({pooling['windows']} windows, {pooling['map_hw'][0]}x{pooling['map_hw'][1]} conv5 map at "
        f"{pooling['scale']}): spp.spp_pool {pooling['spp_pool_seconds']:.4f} s vs roi_pool per level "
        f"{pooling['roi_pool_per_level_seconds']:.4f} s ({pooling['speedup']:.1f}x, max |diff| "
        f"{pooling['max_abs_difference']:.2g})",
        f"paper (Table 10, Caffe on a GPU, ZF-5): conv R-CNN {paper['rcnn_conv_s']} s vs SPP "
        f"{paper['spp_1scale_conv_s']} / {paper['spp_5scale_conv_s']} s ({paper['speedup_conv_1scale']}x / "
        f"{paper['speedup_conv_5scale']}x), fc "
        f"{paper['spp_fc_s']} s, overall {paper['speedup_total_1scale']}x / {paper['speedup_total_5scale']}x",
    ]
    if "fc_variants" in results:
        lines += ["", *format_fc_variants(results["fc_variants"])]
    return "\n".join(lines)


def _compression_note(results: dict) -> str:
    compression = results.get("fc_compression", "none")
    if compression == "svd":
        return f", truncated SVD (ranks fc6/fc7 {'/'.join(map(str, results['fc_svd_ranks']))})"
    return ", int8" if compression == "int8" else ""


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _peak_text(peak: dict) -> str:
    """``float32 812.3 GFLOP/s (linear, fc6 2000x12800x4096)``, or why a type's peak was not measured."""
    if peak.get("gflops") is None:
        return f"{peak['dtype']} not measured ({peak.get('not_measured', 'no kernel')})"
    best = peak["best"]
    held = peak.get("sustained")
    held_text = (f", held {held['gflops']:.1f} back to back for {held['seconds']:.1f} s" if held else "")
    return (f"{peak['dtype']} {peak['gflops']:.1f} GFLOP/s ({best['kernel']}, {best['shape']} "
            f"{'x'.join(map(str, best['shape_mkn']))}{held_text})")


def _heap_note(kept_bytes: int) -> str:
    return f", malloc keeps up to {kept_bytes >> 20} MiB freed (core/memory.py)" if kept_bytes else ""


def format_fc_variants(compared: dict) -> list[str]:
    """The fc variants' tables: per variant, fc6+fc7 seconds, speed-up, FLOPs, rate against its own type's GEMM
    peak, SPP and R-CNN totals with it in both modes and their ratios; then its distance to float32."""
    lines = [
        f"fc6+fc7 variants, each timed in every mode of the same runs (conv shared; pooling shared but for a head "
        f"that takes uint8 rows, pooled apart for it; * = the one in the table above): svd ranks {'/'.join(map(str, compared['svd_ranks']))}, {compared['quantized_engine']} int8 "
        f"kernels, native bfloat16 {compared['bfloat16_native']}",
        "fc GF/s, % of peak: SPP 1-scale's fc6+fc7 rate, against the GEMM peak of the variant's own type (its best "
        "call); % held: against the rate that GEMM holds back to back; SPP1 / SPP5 / R-CNN s: totals per image with "
        "it; total 1sc / 5sc: R-CNN's total over SPP's",
        f"{'variant':<15}{'SPP1 pool':>10}{'SPP1 fc s':>10}{'vs f32':>8}{'MFLOP/win':>10}{'fc GF/s':>9} {'% of peak':<15}{'% held':>7}"
        f"{'SPP1 s':>9}{'SPP5 s':>9}{'R-CNN s':>9}{'total 1sc':>10}{'total 5sc':>10}",
    ]
    shown = {name: data for name, data in compared["variants"].items() if "skipped" not in data}
    for name, data in compared["variants"].items():
        label = f"{name}{' *' if name == compared['selected'] else ''}"
        if name not in shown:
            lines.append(f"{label:<15}  skipped: {data['skipped']}")
            continue
        modes = data["modes"]
        of_peak = f"{_percent(data['fc_fraction_of_peak']):>5} {data['peak_dtype']:<9}"
        lines.append(f"{label:<15}{modes['spp_1scale']['pool_seconds']:>10.4f}{data['seconds']:>10.4f}"
                     f"{data['speedup']:>7.2f}x"
                     f"{data['flops_per_window'] / 1e6:>10.2f}"
                     f"{modes['spp_1scale']['fc_gflops_per_s']:>9.1f} {of_peak}"
                     f"{_percent(data.get('fc_fraction_of_sustained')):>7}"
                     f"{modes['spp_1scale']['total_seconds']:>9.3f}{modes['spp_5scale']['total_seconds']:>9.3f}"
                     f"{modes['rcnn']['total_seconds']:>9.2f}{data['speedup_total_1scale']:>9.1f}x"
                     f"{data['speedup_total_5scale']:>9.1f}x")
    if shown:
        any_variant = next(iter(shown.values()))
        lines.append(f"conv speed-up (every variant): 1-scale {any_variant['speedup_conv_1scale']:.1f}x, 5-scale "
                     f"{any_variant['speedup_conv_5scale']:.1f}x; totals are conv + the variant's pool + its fc per image")
    lines += [
        "",
        f"their distance to float32 on the same windows ({compared['windows_per_image']:.0f} per image pooled at "
        f"{compared['scale'][0]}, {compared['images']} image(s)): max |diff| / max |float32| and mean |diff| / mean "
        "|float32|, of fc7 and of the scores the float32 fc8 gives each variant's fc7",
        f"{'variant':<15}{'fc7 max':>10}{'fc7 mean':>10}{'score max':>11}{'score mean':>11}{'top-1 same':>11}",
    ]
    for name, data in shown.items():
        lines.append(f"{name:<15}{data['fc7_max_rel_diff']:>10.1e}{data['fc7_mean_rel_diff']:>10.1e}"
                     f"{data['score_max_rel_diff']:>11.1e}{data['score_mean_rel_diff']:>11.1e}"
                     f"{100 * data['top1_agreement']:>10.1f}%")
    return lines
