"""``spp bench``: time SPP-net against R-CNN side by side (the paper's Table 10 measurement) on this machine.

The three modes share the images, the windows, the weights (one ``SppNet``) and the device:

- **R-CNN mode** (``core/rcnn.py``): every window cropped with 16 px of context, warped to 224 x 224, run through
  the conv layers in batches; SPP over each crop's whole 13 x 13 conv5 map; fc6-fc7.
- **SPP 1-scale / 5-scale**: the conv layers run once per image and scale (``cfg.features.one_scale`` /
  ``cfg.features.scales``), each window is pooled from conv5 at its best scale (SPEC §2), fc6-fc7.

Phases per image: **conv** (pixel preprocessing: crop + warp for R-CNN, resize for SPP; then the conv layers),
**pool** (scale choice, window -> cell mapping and SPP), **fc** (fc6 and fc7: R-CNN's over every window, SPP's
over the distinct windows), **total** = the sum. Times are medians over ``repeats`` after a warm-up, averaged
over the images.

R-CNN's conv and pool cost is exactly linear in the number of windows (every window is the same 224 x 224 crop,
whatever its box), so on a CPU it is timed on ``rcnn_windows`` evenly spaced windows and scaled linearly; its fc
phase is timed on all windows (the pooled vectors of the timed subset repeated), like the SPP modes' fc.

The SPP path is detect's own (``spp_pooled_windows``: ``fcfeatures.distinct_windows`` and ``pool_windows``, then
``fcfeatures.head_rows``): inference mode, conv maps and pooling on the device, windows that land on the same
conv5 rectangle at the same scale pooled and pushed through fc once (their features are identical: the released
code de-duplicates the same way, SPEC §5), fc6/fc7 as large contiguous GEMMs, all cores in use, channels-last
(NHWC) convolutions in every mode. On CUDA, TF32 matmuls and convolutions
(``cuda_tf32``; scores change by < 1e-2 relative, tests/test_bench.py). ``fc_dtype="bfloat16"`` runs fc6/fc7 of
every mode in bfloat16 (opt-in: about 2x the GEMM rate where the hardware has it, fc7 within ~1e-2 relative), and
``detect.fc_compression`` ("svd" / "int8", ``core/fccompress.py``) compresses them in every mode.

The fc variants side by side (``fc_variants.py``): every mode runs float32, bfloat16, SVD and int8 fc6+fc7 on its
own rows in every timed run, through the same fc code (``measure.time_fc``), so each variant gets its SPP and
R-CNN totals and their ratio from one run; the selected one (``fc_dtype``, ``detect.fc_compression``) fills the
main table. Also their speed-up over float32 and how far their fc7 features and scores are from float32's.

FLOPs are counted from the layer shapes with forward hooks (``FlopCounter``: 2 x multiply-adds of every Conv2d
and Linear actually executed; biases, ReLU, LRN and pooling not counted) and divided by each phase's time. The
reference for the fc rate is the GEMM peak of each variant's own type (float32, bfloat16, int8;
``matmul_peak``): the best of repeated GEMMs after warm-ups, at fc6's and fc7's own shapes and a large square
one, with nn.Linear's kernel and a plain matmul (int8: the int8 layer and ``torch._int_mm``), in the modes'
thread setting, before and after the timed runs.

The code: this package's ``__init__`` runs the benchmark (``run``: warm-up, repeats, aggregation); ``inputs.py``
makes the images, windows and weights; ``rcnn_mode.py`` and ``spp_mode.py`` time one image in R-CNN and SPP
mode (``spp_mode.py`` also the SPP layer alone); ``fc_variants.py`` the fc variants; ``measure.py`` holds the
FLOP counter, the phase timer and the matmul peak; ``formatting.py`` the printed report.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..core import fccompress, memory, nets, rcnn
from ..core.artifacts import Run, atomic_write_json
from ..core.config import CHOICES
from ..core.errors import SppError
from ..core.logs import progress
from .inputs import MIN_BOX_SIDE, SYNTH_IMAGE_HW, BenchInputs, bench_inputs, bench_model, random_boxes
from .measure import (CLOCKS, CPU_MATMUL_SHAPE, CUDA_MATMUL_SHAPE, MODE_NAMES, MODES, PHASES, FlopCounter,
                      PhaseTimer, _Setup, _speed_settings, matmul_gflops, matmul_peak, peak_dtype)
from . import fc_variants
from .rcnn_mode import time_rcnn
from .formatting import PAPER_TABLE10, _device_name, _ratio, format_report
from .spp_mode import SppPathInfo, _pooling_comparison, spp_pooled_windows, spp_window_features, time_spp

CPU_RCNN_WINDOWS = 128  # R-CNN windows timed per image on a CPU (then scaled linearly); all of them on a GPU

__all__ = ["FlopCounter", "PhaseTimer", "matmul_gflops", "matmul_peak", "spp_window_features",
           "spp_pooled_windows", "SppPathInfo", "random_boxes",
           "bench_inputs", "bench_model", "BenchInputs", "run", "format_report", "PAPER_TABLE10", "time_rcnn",
           "time_spp", "CLOCKS", "CPU_MATMUL_SHAPE", "CUDA_MATMUL_SHAPE", "CPU_RCNN_WINDOWS", "MODES", "MODE_NAMES",
           "PHASES", "MIN_BOX_SIDE", "SYNTH_IMAGE_HW", "_speed_settings"]


def _time_mode(mode: str, setup: _Setup, image: np.ndarray, boxes: np.ndarray, rcnn_keep: int | None = None,
               turn: int = 0) -> dict:
    """One timed run of one mode on one image: per-phase seconds and FLOPs, R-CNN's scaled to all windows; fc is
    the selected variant's, and ``fc_variants`` holds every variant's fc seconds and FLOPs in this same run."""
    timer = PhaseTimer(setup.device, setup.clock)
    result: dict = {"windows": len(boxes)}
    heads = setup.fc_heads()
    with FlopCounter({"conv": setup.backbone, **{f"fc:{name}": head for name, head in heads.items()}}) as counter:
        if mode == "rcnn":
            seconds, conv_flops, extra = time_rcnn(setup, image, boxes, rcnn_keep or setup.rcnn_keep, timer, counter,
                                                   turn)
        else:
            seconds, conv_flops, extra = time_spp(mode, setup, image, boxes, timer, counter, turn)
        result.update(extra)
    result["seconds"] = {phase: float(seconds.get(phase, 0.0)) for phase in PHASES}
    result["seconds"]["total"] = sum(result["seconds"][p] for p in PHASES)
    result["flops"] = {"conv": float(conv_flops), "fc": float(counter.flops[f"fc:{setup.selected}"])}
    result["fc_variants"] = {name: {"seconds": float(seconds[f"fc:{name}"]),
                                    "pool_seconds": float(seconds[f"pool:{name}"]),
                                    "flops": float(counter.flops[f"fc:{name}"])} for name in heads}
    return result


def _aggregate(samples: list[list[dict]]) -> dict:
    """samples[image][repeat] -> per phase: median over repeats, then mean over images; FLOPs likewise; per fc
    variant its pool and fc seconds and its total (conv + its own pooling: float32 or uint8 rows, + its own fc) the
    same way."""
    def typical(value) -> float:
        return statistics.mean(statistics.median(value(s) for s in reps) for reps in samples)

    out: dict = {"seconds": {}, "flops": {}}
    for phase in (*PHASES, "total"):
        out["seconds"][phase] = typical(lambda s: s["seconds"][phase])
    for kind in ("conv", "fc"):
        out["flops"][kind] = typical(lambda s: s["flops"][kind])
    for key in ("unique_windows", "timed_windows", "scale_factor", "windows"):
        if key in samples[0][0]:
            out[key] = typical(lambda s: s[key])
    conv_s, fc_s = out["seconds"]["conv"], out["seconds"]["fc"]
    out["gflops_per_s"] = {"conv": out["flops"]["conv"] / conv_s / 1e9 if conv_s > 0 else 0.0,
                           "fc": out["flops"]["fc"] / fc_s / 1e9 if fc_s > 0 else 0.0}
    out["fc_variants"] = {}
    for name in samples[0][0].get("fc_variants", {}):
        seconds = typical(lambda s: s["fc_variants"][name]["seconds"])
        flops = typical(lambda s: s["fc_variants"][name]["flops"])
        out["fc_variants"][name] = {
            "fc_seconds": seconds, "fc_flops": flops, "fc_gflops_per_s": flops / seconds / 1e9 if seconds > 0 else 0.0,
            "pool_seconds": typical(lambda s: s["fc_variants"][name]["pool_seconds"]),
            "total_seconds": typical(lambda s: s["seconds"]["conv"] + s["fc_variants"][name]["pool_seconds"]
                                     + s["fc_variants"][name]["seconds"])}
    return out


def _fc_shapes(head: nets.SppHead, windows: int, fc_batch: int,
               square: tuple[int, int, int] | None) -> dict[str, tuple[int, int, int]]:
    """The GEMMs of the matmul peak: fc6's and fc7's own (M = the rows of one fc batch of an image's windows) and
    a large square one."""
    rows = max(1, min(int(windows), int(fc_batch)))
    shapes = {name: (rows, getattr(head, name).in_features, getattr(head, name).out_features)
              for name in ("fc6", "fc7")}
    if square is not None:
        shapes["square"] = tuple(int(v) for v in square)
    return shapes


def _matmul_peaks(device: torch.device, dtypes, shapes: dict, clock: str, previous: dict | None = None,
                  when: str = "", sustained_seconds: float = 0.0) -> dict:
    """``matmul_peak`` of each type in ``dtypes``, keeping ``previous`` measurements (the best of both counts);
    with ``sustained_seconds``, also the rate the best GEMM holds (``sustained_gflops``)."""
    return {dtype: matmul_peak(device, dtype, shapes, clock, previous=(previous or {}).get(dtype), when=when,
                               sustained_seconds=sustained_seconds)
            for dtype in dtypes}


def run(cfg, n_images: int = 3, windows: int = 2000, repeats: int = 3, json_out: Path | None = None, *,
        rcnn_windows: int | None = None, rcnn_input_size: int = rcnn.RCNN_INPUT_SIZE,
        synth_hw: tuple[int, int] = SYNTH_IMAGE_HW, matmul_shape: tuple[int, int, int] | None = None,
        channels_last: bool = True, cuda_tf32: bool = True, fc_dtype: str = "float32",
        threads: int | None = None, clock: str = "wall", sustained_seconds: float = 0.0) -> str:
    """Time R-CNN mode, SPP 1-scale and SPP 5-scale per image; returns the printable report and, with
    ``json_out``, writes every figure to that JSON file.

    ``channels_last``: NHWC convolutions for every mode (faster with oneDNN and cuDNN, same results to float
    rounding). ``fc_dtype``: "float32" (default: exact results) or "bfloat16" (fc6/fc7 of every mode in bfloat16,
    ~2x the GEMM rate on CPUs with AVX512-BF16 or AMX and on GPUs; fc7 changes by ~1e-2 relative).
    ``cfg.detect.fc_compression`` / ``fc_svd_ranks``: fc6/fc7 compressed in every mode ("none": exact); every fc
    variant is also timed and compared side by side (``fc_variants``, the report's last table).
    ``threads``: CPU threads for the kernels, default one per available core. ``rcnn_windows``: R-CNN windows
    timed per image (default: 128 on a CPU, every window on a GPU). ``clock``: "wall" (default) or "cpu" (process
    CPU time, for a machine shared with other jobs: use with ``threads=1``; see ``PhaseTimer``).
    ``matmul_shape``: the large square GEMM of the matmul peak (default ``CPU_MATMUL_SHAPE`` /
    ``CUDA_MATMUL_SHAPE``); the peak of each type is the best over it and fc6's and fc7's own shapes, measured
    before and after the timed runs (``matmul_peak``). ``sustained_seconds`` > 0: after the timed runs, each
    type's best GEMM also runs back to back this long, for the rate it holds (``sustained_gflops``; the CLI's
    default is 6 s), and each fc rate is also given against it.
    """
    if not sustained_seconds >= 0:  # NaN too
        raise SppError(f"sustained_seconds must be 0 (skip) or positive, got {sustained_seconds}")
    if n_images < 1 or windows < 1 or repeats < 1 or (rcnn_windows is not None and rcnn_windows < 1):
        raise SppError(f"bench needs at least one image, window, repeat and R-CNN window (got images={n_images}, "
                       f"windows={windows}, repeats={repeats}, rcnn_windows={rcnn_windows})")
    if threads is not None and threads < 0:
        raise SppError(f"bench threads must be at least 1 (or 0 for all cores), got {threads}")
    if fc_dtype not in CHOICES["detect.fc_dtype"]:
        raise SppError(f"unknown fc dtype {fc_dtype!r} (known: {', '.join(CHOICES['detect.fc_dtype'])})")
    device = nets.resolve_device(cfg.device)
    fccompress.check_combination(cfg.detect.fc_compression, fc_dtype, device)  # before any work
    if rcnn_windows is None:
        rcnn_windows = CPU_RCNN_WINDOWS if device.type == "cpu" else windows
    PhaseTimer(device, clock)  # an unusable clock fails here, before any work
    run_dir = Run(cfg.run_dir)
    threads = int(threads) if threads else len(os.sched_getaffinity(0))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    load_before = os.getloadavg()
    started = time.perf_counter()

    inputs = bench_inputs(cfg, run_dir, n_images, windows, synth_hw)
    model, weights = bench_model(cfg, run_dir)
    model = model.to(device).eval()
    model.backbone.to(memory_format=memory_format)
    selected = (cfg.detect.fc_compression, fc_dtype)
    head = fccompress.compress_head(model.head, cfg.detect.fc_compression, cfg.detect.fc_svd_ranks,
                                    getattr(torch, fc_dtype))
    heads, made = fc_variants.variant_heads(model.head, device, cfg.detect.fc_svd_ranks, selected, head)
    selected_name = fc_variants.variant_name(*selected)
    setup = _Setup(backbone=model.backbone, head=head, device=device, pyramid=tuple(cfg.model.pyramid),
                   scales={"spp_1scale": [int(cfg.features.one_scale)],
                           "spp_5scale": [int(s) for s in cfg.features.scales]},
                   rule=cfg.features.scale_rule, fc_batch=cfg.detect.batch_windows,
                   rcnn_keep=min(rcnn_windows, windows), rcnn_input=rcnn_input_size,
                   rcnn_batch=rcnn.RCNN_BATCH if device.type == "cpu" else 4 * rcnn.RCNN_BATCH,
                   memory_format=memory_format, clock=clock, heads=heads, selected=selected_name)
    # The GEMM types the variants run in (the selected one's first), and the shapes of their peak.
    peak_types = list(dict.fromkeys(peak_dtype(*made["pairs"][name]) for name in (selected_name, *heads)))
    square = matmul_shape or (CUDA_MATMUL_SHAPE if device.type == "cuda" else CPU_MATMUL_SHAPE)
    peak_shapes = _fc_shapes(model.head, windows, setup.fc_batch, square)

    samples: dict[str, list[list[dict]]] = {mode: [[] for _ in inputs.images] for mode in MODES}
    with _speed_settings(device, threads, cuda_tf32), torch.inference_mode():
        # The peak before and after the timed runs, in their thread and precision settings: a load that comes
        # or goes during the run cannot leave the fc layers faster than the "peak".
        peaks = _matmul_peaks(device, peak_types, peak_shapes, clock, when="before")
        first_image, first_boxes = inputs.images[0][1], inputs.boxes[0]
        for mode in MODES:  # warm-up: library initialisation, kernel selection, allocator growth
            _time_mode(mode, setup, first_image, first_boxes, rcnn_keep=min(setup.rcnn_keep, setup.rcnn_batch))
        with progress(total=repeats * len(inputs.images) * len(MODES), desc="bench", unit="run") as bar:
            for turn in range(repeats):
                for k, ((_image_id, image), boxes) in enumerate(zip(inputs.images, inputs.boxes)):
                    for mode in MODES:
                        samples[mode][k].append(_time_mode(mode, setup, image, boxes, turn=turn))
                        bar.update()
        # The rate each best GEMM holds, measured after the timed runs, in the state they left the machine in.
        peaks = _matmul_peaks(device, peak_types, peak_shapes, clock, previous=peaks, when="after",
                              sustained_seconds=sustained_seconds)
        modes = {mode: _aggregate(samples[mode]) for mode in MODES}
        speeds = fc_variants.variant_speeds(modes, peaks, made["pairs"])
        pooling = _pooling_comparison(setup, first_image, first_boxes, max(3, repeats))
        raw_spp_fc = {name: [[s["fc_variants"][name]["seconds"] for s in reps] for reps in samples["spp_1scale"]]
                      for name in heads}
        compared = fc_variants.compare_fc_variants(setup, model.head, heads, made, inputs.images, inputs.boxes,
                                                   cfg.detect.fc_svd_ranks, selected, speeds, raw_spp_fc)
    load_after = os.getloadavg()

    seconds = {mode: modes[mode]["seconds"] for mode in MODES}
    ratio = _ratio
    matmul = peaks[peak_types[0]]  # the selected variant's type
    results = {
        "device": _device_name(device),
        "threads": threads,
        "clock": clock,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "torch": torch.__version__,
        "backbone": cfg.model.backbone,
        "weights": weights,
        "images": inputs.image_source,
        "image_ids": [image_id for image_id, _ in inputs.images],
        "proposals": inputs.box_source,
        "windows": windows,
        "rcnn_windows_timed": setup.rcnn_keep,
        "rcnn_input_size": rcnn_input_size,
        "rcnn_context": rcnn.RCNN_CONTEXT,
        "repeats": repeats,
        "scales_1scale": setup.scales["spp_1scale"],
        "scales_5scale": setup.scales["spp_5scale"],
        "pyramid": list(cfg.model.pyramid),
        "fc_dim": model.head.fc_dim,
        "channels_last": bool(channels_last),
        "cuda_tf32": bool(cuda_tf32 and device.type == "cuda"),
        "fc_dtype": fc_dtype,
        "malloc_kept_bytes": memory.kept_bytes(),  # spp bench's heap setting (core/memory.py); 0: glibc's default
        "fc_compression": cfg.detect.fc_compression,
        "fc_svd_ranks": list(cfg.detect.fc_svd_ranks),
        "fc_layers": fccompress.layer_summary(head),
        "modes": modes,
        "speedup_total_1scale": ratio(seconds["rcnn"]["total"], seconds["spp_1scale"]["total"]),
        "speedup_conv_1scale": ratio(seconds["rcnn"]["conv"], seconds["spp_1scale"]["conv"]),
        "speedup_total_5scale": ratio(seconds["rcnn"]["total"], seconds["spp_5scale"]["total"]),
        "speedup_conv_5scale": ratio(seconds["rcnn"]["conv"], seconds["spp_5scale"]["conv"]),
        "flop_ratio_conv_1scale": ratio(modes["rcnn"]["flops"]["conv"], modes["spp_1scale"]["flops"]["conv"]),
        "flop_ratio_conv_5scale": ratio(modes["rcnn"]["flops"]["conv"], modes["spp_5scale"]["flops"]["conv"]),
        "matmul": matmul,
        "matmul_gflops": matmul["gflops"],
        "matmul_peaks": peaks,
        "fc_fraction_of_matmul_peak": speeds[selected_name]["fc_fraction_of_peak"],
        "fc_fraction_of_sustained": speeds[selected_name]["fc_fraction_of_sustained"],
        "spp_1scale_seconds_per_image": seconds["spp_1scale"]["total"],
        "spp_5scale_seconds_per_image": seconds["spp_5scale"]["total"],
        "rcnn_seconds_per_image": seconds["rcnn"]["total"],
        "pooling": pooling,
        "fc_variants": compared,
        "paper_table10": PAPER_TABLE10,
        "raw": {mode: [[s["seconds"] for s in reps] for reps in samples[mode]] for mode in MODES},
        "raw_fc_variants": {mode: [[{name: v["seconds"] for name, v in s["fc_variants"].items()} for s in reps]
                                   for reps in samples[mode]] for mode in MODES},
        "wall_seconds": time.perf_counter() - started,
    }
    if json_out is not None:
        atomic_write_json(Path(json_out), results)
    return format_report(results)
