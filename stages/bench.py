"""``spp bench``: time SPP-net against R-CNN side by side (the paper's Table 10 measurement) on this machine.

The three modes share the images, the windows, the weights (one ``SppNet``) and the device:

- **R-CNN mode** (``core/rcnn.py``): every window cropped with 16 px of context, warped to 224 x 224, run through
  the conv layers in batches; SPP over each crop's whole 13 x 13 conv5 map; fc6-fc7.
- **SPP 1-scale / 5-scale**: the conv layers run once per image and scale (``cfg.features.one_scale`` /
  ``cfg.features.scales``), each window is pooled from conv5 at its best scale (SPEC §2), fc6-fc7.

Phases per image: **conv** (pixel preprocessing: crop + warp for R-CNN, resize for SPP; then the conv layers),
**pool** (scale choice, window -> cell mapping and SPP), **fc** (fc6 and fc7 over every window), **total** = the
sum. Times are medians over ``repeats`` after a warm-up, averaged over the images.

R-CNN's conv and pool cost is exactly linear in the number of windows (every window is the same 224 x 224 crop,
whatever its box), so on a CPU it is timed on ``rcnn_windows`` evenly spaced windows and scaled linearly; its fc
phase is timed on all windows (the pooled vectors of the timed subset repeated), like the SPP modes' fc.

The SPP path is the fast one (``spp_window_features``): inference mode, conv maps and pooling on the device,
windows that land on the same conv5 rectangle at the same scale pooled and pushed through fc once (their features
are identical: the released code de-duplicates the same way, SPEC §5), fc6/fc7 as large contiguous float32 GEMMs,
all cores in use, channels-last (NHWC) convolutions in every mode. On CUDA, TF32 matmuls and convolutions
(``cuda_tf32``; scores change by < 1e-2 relative, tests/test_bench.py). ``fc_dtype="bfloat16"`` runs fc6/fc7 of
every mode in bfloat16 (opt-in: about 2x the GEMM rate where the hardware has it, fc7 within ~1e-2 relative).

FLOPs are counted from the layer shapes with forward hooks (``FlopCounter``: 2 x multiply-adds of every Conv2d
and Linear actually executed; biases, ReLU, LRN and pooling not counted) and divided by each phase's time. The
machine's float32 matmul rate (``matmul_gflops``) is the reference for ``fc_fraction_of_matmul_peak``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .core import fcfeatures, nets, rcnn, spp
from .core.artifacts import Run, atomic_write_json
from .core.config import CHOICES
from .core.errors import SppError, StageInputMissing

CPU_RCNN_WINDOWS = 128  # R-CNN windows timed per image on a CPU (then scaled linearly); all of them on a GPU
SYNTH_IMAGE_HW = (375, 500)  # a typical VOC image (height, width)
MIN_BOX_SIDE = 20  # smallest random box side, like selective search's filter (SPEC §3)
CPU_MATMUL_SHAPE = (2048, 4096, 4096)  # (M, K, N): about the fc7 GEMM of 2000 windows
CUDA_MATMUL_SHAPE = (8192, 8192, 8192)
MODES = ("rcnn", "spp_1scale", "spp_5scale")
MODE_NAMES = {"rcnn": "R-CNN", "spp_1scale": "SPP 1-scale", "spp_5scale": "SPP 5-scale"}
PHASES = ("conv", "pool", "fc")
# SPP-net Table 10 [P §4.3; SPEC §8]: Caffe, GPU, ZF-5 for both, average over 100 VOC07 images, seconds/image.
PAPER_TABLE10 = {"rcnn_conv_s": 14.37, "spp_1scale_conv_s": 0.053, "spp_5scale_conv_s": 0.293, "spp_fc_s": 0.089,
                 "speedup_conv_1scale": 270, "speedup_conv_5scale": 49, "speedup_total_1scale": 102,
                 "speedup_total_5scale": 38}


# ------------------------------------------------------------------------------------------------ measuring


class FlopCounter:
    """Counts the FLOPs (2 x multiply-adds) of every ``nn.Conv2d`` and ``nn.Linear`` run inside ``with``, from the
    layer shapes and each call's output size, through forward hooks; grouped by the ``groups`` each layer is in.

    ``with FlopCounter({"conv": backbone, "fc": head}) as counter: ...`` then ``counter.flops["conv"]`` and
    ``counter.by_layer["conv.body.conv1"]``. Bias additions, activations, LRN and pooling are not counted.
    """

    def __init__(self, groups: dict[str, nn.Module] | nn.Module):
        self.groups = groups if isinstance(groups, dict) else {"total": groups}
        self.flops: dict[str, int] = defaultdict(int)
        self.by_layer: dict[str, int] = defaultdict(int)
        self._handles: list = []

    @staticmethod
    def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
        if isinstance(module, nn.Conv2d):  # each output element: in/groups x kh x kw multiply-adds
            kh, kw = module.kernel_size
            return 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        if isinstance(module, nn.Linear):  # each output element: in_features multiply-adds
            return 2 * output.numel() * module.in_features
        return 0

    def __enter__(self) -> "FlopCounter":
        for group, root in self.groups.items():
            for name, module in root.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    self._handles.append(module.register_forward_hook(self._hook(group, f"{group}.{name}")))
        return self

    def _hook(self, group: str, name: str):
        def hook(module, _inputs, output):
            flops = self.layer_flops(module, output)
            self.flops[group] += flops
            self.by_layer[name] += flops
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class PhaseTimer:
    """``with timer("conv"): ...`` accumulates seconds per phase; synchronises CUDA at both ends so the time
    covers the work, not just its launch.

    ``clock="wall"``: elapsed time (what a user waits). ``clock="cpu"``: this process's CPU time, which on a
    machine shared with other jobs is still the cost of the work itself; meaningful with one thread (more threads
    add their spin-waiting) and on a CPU device only.
    """

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device = torch.device(device)
        if clock not in CLOCKS or (clock == "cpu" and self.device.type != "cpu"):
            raise SppError(f"clock {clock!r} is not available on {self.device.type} (use wall, or cpu on a CPU)")
        self.now = CLOCKS[clock]
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = self.now()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += self.now() - start


def matmul_gflops(device: torch.device, shape: tuple[int, int, int] | None = None, repeats: int = 5,
                  dtype: torch.dtype = torch.float32, clock: str = "wall") -> dict:
    """The device's GEMM rate: median GFLOP/s of ``[M,K] @ [K,N]`` in ``dtype`` over ``repeats`` after a warm-up
    (float32 uses TF32 on CUDA when the precision flags allow it: the same setting the fc layers run with)."""
    device = torch.device(device)
    m, k, n = shape or (CUDA_MATMUL_SHAPE if device.type == "cuda" else CPU_MATMUL_SHAPE)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    timer = PhaseTimer(device, clock)
    seconds = []
    with torch.inference_mode():
        torch.mm(a, b, out=out)  # warm-up: library initialisation, allocation
        for _ in range(max(1, repeats)):
            timer.seconds.clear()
            with timer("mm"):
                torch.mm(a, b, out=out)
            seconds.append(timer.seconds["mm"])
    median = statistics.median(seconds)
    return {"shape_mkn": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "seconds": median,
            "gflops": 2.0 * m * k * n / median / 1e9}


# ------------------------------------------------------------------------------------------------ the SPP path


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
            dtype = head.fc6.weight.dtype  # a bfloat16 copy of the head takes bfloat16 input
            parts = [head.features(pooled[i:i + step].to(dtype), layer) for i in range(0, len(pooled), step)]
            unique_features = (torch.cat(parts).float() if parts
                               else pooled.new_zeros((0, getattr(head, layer).out_features)))
        features = unique_features.index_select(0, torch.from_numpy(inverse).to(device))
    return features, info


# ------------------------------------------------------------------------------------------------ inputs


def _texture_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random-texture RGB uint8 image: noise summed over several octaves (smooth blobs to fine grain)."""
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 1.0), (16, 0.6), (64, 0.35), (256, 0.2)):
        small = rng.random((max(2, cells * height // max(height, width)), max(2, cells * width // max(height, width)),
                            3)).astype(np.float32)
        canvas += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas += 0.15 * rng.random((height, width, 3), dtype=np.float32)  # pixel-level grain
    canvas -= canvas.min()
    return np.ascontiguousarray((255.0 * canvas / max(float(canvas.max()), 1e-6)).astype(np.uint8))


def random_boxes(rng: np.random.Generator, image_hw: tuple[int, int], count: int,
                 min_side: int = MIN_BOX_SIDE) -> np.ndarray:
    """``count`` boxes inside the image with a proposal-like size distribution: side sqrt(w h) log-uniform from
    ``min_side`` to the image's geometric mean side, aspect w/h log-uniform in [1/3, 3]; float64 [count, 4]."""
    height, width = (int(v) for v in image_hw)
    low = min(float(min_side), float(min(height, width)))
    side = np.exp(rng.uniform(math.log(low), math.log(max(low, math.sqrt(height * width))), count))
    aspect = np.exp(rng.uniform(math.log(1 / 3), math.log(3), count))
    box_w = np.clip(side * np.sqrt(aspect), low, width)
    box_h = np.clip(side / np.sqrt(aspect), low, height)
    x1 = rng.uniform(0, 1, count) * (width - box_w)
    y1 = rng.uniform(0, 1, count) * (height - box_h)
    return np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1)


@dataclass
class BenchInputs:
    images: list[tuple[str, np.ndarray]]
    boxes: list[np.ndarray]
    image_source: str
    box_source: str


def bench_inputs(cfg, run: Run, n_images: int, windows: int,
                 synth_hw: tuple[int, int] = SYNTH_IMAGE_HW) -> BenchInputs:
    """The run's dataset images (its test split) when the dataset is there, else synthetic random-texture images;
    the run's stored proposals, else live selective search on dataset images, else seeded random boxes. Every
    image gets exactly ``windows`` boxes (topped up with random boxes, and said so, when proposals run short)."""
    from .core.voc import VocDataset, resolve_voc_root
    from .core.proposals import image_seed, load_proposals, selective_search

    rng = np.random.default_rng(cfg.seed)
    dataset = None
    try:
        dataset = VocDataset.from_config(cfg.data)
        image_ids = dataset.image_ids(cfg.data.test_split)[:n_images]
    except SppError:
        dataset = None
    if dataset is None:
        images = [(f"synthetic{k}", _texture_image(rng, *synth_hw)) for k in range(n_images)]
        image_source = f"{n_images} synthetic random-texture images {synth_hw[1]}x{synth_hw[0]} (no dataset found)"
        boxes = [random_boxes(rng, synth_hw, windows) for _ in images]
        box_source = f"{windows} seeded random boxes/image (log-uniform size {MIN_BOX_SIDE} px..image, aspect 1/3..3)"
        return BenchInputs(images, boxes, image_source, box_source)

    images = [(image_id, dataset.load_image(image_id)) for image_id in image_ids]
    image_source = (f"{len(images)} images of {cfg.data.dataset} {cfg.data.test_split} "
                    f"({dataset.devkit_root}), mean size {_mean_size(images)}")
    store = None
    with contextlib.suppress(SppError):  # not run, stale or unreadable: propose live instead
        store = load_proposals(run, cfg.data.test_split)
    live_params = dataclasses.replace(cfg.proposals, max_boxes=windows)
    boxes, topped_up = [], 0
    for image_id, image in images:
        if store is not None and image_id in store:
            found = store.boxes(image_id)
        else:
            found = selective_search(image, live_params, seed=image_seed(cfg.seed, image_id))
        found = found[:windows]
        if len(found) < windows:
            topped_up += windows - len(found)
            found = np.concatenate([found, random_boxes(rng, image.shape[:2], windows - len(found))])
        boxes.append(found)
    if store is not None:
        store.close()
    method = "stored selective-search proposals of the run" if store is not None else "selective search, run live"
    box_source = f"{windows} windows/image: {method}"
    if topped_up:
        box_source += f" (topped up with {topped_up} seeded random boxes in all where fewer were found)"
    return BenchInputs(images, boxes, image_source, box_source)


def _mean_size(images: list[tuple[str, np.ndarray]]) -> str:
    heights = [im.shape[0] for _, im in images]
    widths = [im.shape[1] for _, im in images]
    return f"{statistics.mean(widths):.0f}x{statistics.mean(heights):.0f}"


def bench_model(cfg, run: Run) -> tuple[nets.SppNet, str]:
    """The run's pretrained SppNet when ``spp pretrain`` has finished, else a seeded random-init one (the same
    weights for every mode either way)."""
    try:
        manifest = run.require("pretrain")
    except StageInputMissing:
        manifest = None
    if manifest is not None:
        try:
            path = manifest.output("model")
        except SppError:
            path = manifest.folder / "model.pt"
        model, _meta = nets.load_checkpoint(path, expect_backbone=cfg.model.backbone)
        return model, f"pretrained checkpoint {path}"
    torch.manual_seed(cfg.seed)
    model = nets.build_sppnet(cfg.model.backbone, cfg.model.weights, cfg.model.pyramid, cfg.model.fc_dim,
                              num_classes=1000, dropout=cfg.model.dropout, width=cfg.model.width)
    trunk = f"trunk weights {cfg.model.weights}" if cfg.model.weights else "random init"
    return model, f"{trunk} (seed {cfg.seed}; no pretrain checkpoint in {run.root})"


# ------------------------------------------------------------------------------------------------ the benchmark


@contextlib.contextmanager
def _speed_settings(device: torch.device, threads: int, cuda_tf32: bool) -> Iterator[None]:
    """Thread count for the CPU kernels; TF32 matmuls/convolutions and cuDNN autotuning on CUDA; restored after."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cuda_tf32
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved[1:]


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


def _even_subset(count: int, keep: int) -> np.ndarray:
    """``keep`` evenly spaced indices of ``range(count)``."""
    keep = max(1, min(count, keep))
    return np.floor(np.arange(keep) * (count / keep)).astype(np.int64)


@dataclass
class _Setup:
    """What every timed run shares: the modules (``head`` may be a bfloat16 copy), scales, sizes, formats."""

    backbone: nets.Backbone
    head: nets.SppHead
    device: torch.device
    pyramid: tuple[int, ...]
    scales: dict[str, list[int]]  # mode -> SPP scales
    rule: str
    fc_batch: int
    rcnn_keep: int  # R-CNN windows timed per image
    rcnn_input: int
    rcnn_batch: int
    memory_format: torch.memory_format
    clock: str = "wall"


def _time_mode(mode: str, setup: _Setup, image: np.ndarray, boxes: np.ndarray, rcnn_keep: int | None = None) -> dict:
    """One timed run of one mode on one image: per-phase seconds and FLOPs, R-CNN's scaled to all windows."""
    timer = PhaseTimer(setup.device, setup.clock)
    backbone, head = setup.backbone, setup.head
    result: dict = {"windows": len(boxes)}
    with FlopCounter({"conv": backbone, "fc": head}) as counter:
        if mode == "rcnn":
            subset = boxes[_even_subset(len(boxes), rcnn_keep or setup.rcnn_keep)]
            pooled = rcnn.rcnn_window_pooled(backbone, image, subset, backbone.spec, setup.pyramid, setup.rcnn_input,
                                             batch=setup.rcnn_batch, timer=timer, memory_format=setup.memory_format)
            factor = len(boxes) / len(subset)
            conv_flops = counter.flops["conv"] * factor
            # fc on as many rows as there are windows: the same GEMMs the full R-CNN run would do.
            rows = pooled.index_select(0, torch.arange(len(boxes), device=pooled.device) % len(subset))
            with timer("fc"):
                rows = rows.to(head.fc6.weight.dtype)
                for i in range(0, len(rows), setup.fc_batch):
                    head.features(rows[i:i + setup.fc_batch], "fc7").float()
            seconds = {"conv": timer.seconds["conv"] * factor, "pool": timer.seconds["pool"] * factor,
                       "fc": timer.seconds["fc"]}
            result.update(timed_windows=len(subset), scale_factor=factor)
        else:
            _features, info = spp_window_features(backbone, head, image, boxes, setup.scales[mode], setup.pyramid,
                                                  setup.rule, "fc7", setup.fc_batch, timer, setup.memory_format)
            conv_flops = counter.flops["conv"]
            seconds = dict(timer.seconds)
            result.update(unique_windows=info.unique_windows)
        fc_flops = counter.flops["fc"]
    result["seconds"] = {phase: float(seconds.get(phase, 0.0)) for phase in PHASES}
    result["seconds"]["total"] = sum(result["seconds"][p] for p in PHASES)
    result["flops"] = {"conv": float(conv_flops), "fc": float(fc_flops)}
    return result


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


def _aggregate(samples: list[list[dict]]) -> dict:
    """samples[image][repeat] -> per phase: median over repeats, then mean over images; FLOPs likewise."""
    out: dict = {"seconds": {}, "flops": {}}
    for phase in (*PHASES, "total"):
        per_image = [statistics.median(s["seconds"][phase] for s in reps) for reps in samples]
        out["seconds"][phase] = statistics.mean(per_image)
    for kind in ("conv", "fc"):
        out["flops"][kind] = statistics.mean(statistics.median(s["flops"][kind] for s in reps) for reps in samples)
    for key in ("unique_windows", "timed_windows", "scale_factor", "windows"):
        if key in samples[0][0]:
            out[key] = statistics.mean(statistics.median(s[key] for s in reps) for reps in samples)
    conv_s, fc_s = out["seconds"]["conv"], out["seconds"]["fc"]
    out["gflops_per_s"] = {"conv": out["flops"]["conv"] / conv_s / 1e9 if conv_s > 0 else 0.0,
                           "fc": out["flops"]["fc"] / fc_s / 1e9 if fc_s > 0 else 0.0}
    return out


def run(cfg, n_images: int = 3, windows: int = 2000, repeats: int = 3, json_out: Path | None = None, *,
        rcnn_windows: int | None = None, rcnn_input_size: int = rcnn.RCNN_INPUT_SIZE,
        synth_hw: tuple[int, int] = SYNTH_IMAGE_HW, matmul_shape: tuple[int, int, int] | None = None,
        channels_last: bool = True, cuda_tf32: bool = True, fc_dtype: str = "float32",
        threads: int | None = None, clock: str = "wall") -> str:
    """Time R-CNN mode, SPP 1-scale and SPP 5-scale per image; returns the printable report and, with
    ``json_out``, writes every figure to that JSON file.

    ``channels_last``: NHWC convolutions for every mode (faster with oneDNN and cuDNN, same results to float
    rounding). ``fc_dtype``: "float32" (default: exact results) or "bfloat16" (fc6/fc7 of every mode in bfloat16,
    ~2x the GEMM rate on CPUs with AVX512-BF16 or AMX and on GPUs; fc7 changes by ~1e-2 relative).
    ``threads``: CPU threads for the kernels, default one per available core. ``rcnn_windows``: R-CNN windows
    timed per image (default: 128 on a CPU, every window on a GPU). ``clock``: "wall" (default) or "cpu" (process
    CPU time, for a machine shared with other jobs: use with ``threads=1``; see ``PhaseTimer``).
    """
    if n_images < 1 or windows < 1 or repeats < 1 or (rcnn_windows is not None and rcnn_windows < 1):
        raise SppError(f"bench needs at least one image, window, repeat and R-CNN window (got images={n_images}, "
                       f"windows={windows}, repeats={repeats}, rcnn_windows={rcnn_windows})")
    if threads is not None and threads < 0:
        raise SppError(f"bench threads must be at least 1 (or 0 for all cores), got {threads}")
    if fc_dtype not in CHOICES["detect.fc_dtype"]:
        raise SppError(f"unknown fc dtype {fc_dtype!r} (known: {', '.join(CHOICES['detect.fc_dtype'])})")
    device = nets.resolve_device(cfg.device)
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
    head = model.head if fc_dtype == "float32" else copy.deepcopy(model.head).to(torch.bfloat16)
    setup = _Setup(backbone=model.backbone, head=head, device=device, pyramid=tuple(cfg.model.pyramid),
                   scales={"spp_1scale": [int(cfg.features.one_scale)],
                           "spp_5scale": [int(s) for s in cfg.features.scales]},
                   rule=cfg.features.scale_rule, fc_batch=cfg.detect.batch_windows,
                   rcnn_keep=min(rcnn_windows, windows), rcnn_input=rcnn_input_size,
                   rcnn_batch=rcnn.RCNN_BATCH if device.type == "cpu" else 4 * rcnn.RCNN_BATCH,
                   memory_format=memory_format, clock=clock)

    samples: dict[str, list[list[dict]]] = {mode: [[] for _ in inputs.images] for mode in MODES}
    with _speed_settings(device, threads, cuda_tf32), torch.inference_mode():
        matmul = matmul_gflops(device, matmul_shape, dtype=getattr(torch, fc_dtype), clock=clock)
        first_image, first_boxes = inputs.images[0][1], inputs.boxes[0]
        for mode in MODES:  # warm-up: library initialisation, kernel selection, allocator growth
            _time_mode(mode, setup, first_image, first_boxes, rcnn_keep=min(setup.rcnn_keep, setup.rcnn_batch))
        with tqdm(total=repeats * len(inputs.images) * len(MODES), desc="bench", unit="run", disable=None) as bar:
            for _ in range(repeats):
                for k, ((_image_id, image), boxes) in enumerate(zip(inputs.images, inputs.boxes)):
                    for mode in MODES:
                        samples[mode][k].append(_time_mode(mode, setup, image, boxes))
                        bar.update()
        pooling = _pooling_comparison(setup, first_image, first_boxes, max(3, repeats))
    load_after = os.getloadavg()

    modes = {mode: _aggregate(samples[mode]) for mode in MODES}
    seconds = {mode: modes[mode]["seconds"] for mode in MODES}
    ratio = _ratio
    spp_fc_rate = modes["spp_1scale"]["gflops_per_s"]["fc"]
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
        "modes": modes,
        "speedup_total_1scale": ratio(seconds["rcnn"]["total"], seconds["spp_1scale"]["total"]),
        "speedup_conv_1scale": ratio(seconds["rcnn"]["conv"], seconds["spp_1scale"]["conv"]),
        "speedup_total_5scale": ratio(seconds["rcnn"]["total"], seconds["spp_5scale"]["total"]),
        "speedup_conv_5scale": ratio(seconds["rcnn"]["conv"], seconds["spp_5scale"]["conv"]),
        "flop_ratio_conv_1scale": ratio(modes["rcnn"]["flops"]["conv"], modes["spp_1scale"]["flops"]["conv"]),
        "flop_ratio_conv_5scale": ratio(modes["rcnn"]["flops"]["conv"], modes["spp_5scale"]["flops"]["conv"]),
        "matmul": matmul,
        "matmul_gflops": matmul["gflops"],
        "fc_fraction_of_matmul_peak": spp_fc_rate / matmul["gflops"] if matmul["gflops"] > 0 else 0.0,
        "spp_1scale_seconds_per_image": seconds["spp_1scale"]["total"],
        "spp_5scale_seconds_per_image": seconds["spp_5scale"]["total"],
        "rcnn_seconds_per_image": seconds["rcnn"]["total"],
        "pooling": pooling,
        "paper_table10": PAPER_TABLE10,
        "raw": {mode: [[s["seconds"] for s in reps] for reps in samples[mode]] for mode in MODES},
        "wall_seconds": time.perf_counter() - started,
    }
    if json_out is not None:
        atomic_write_json(Path(json_out), results)
    return format_report(results)


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
        f"{load[1]:.2f} after",
        f"weights: {results['weights']}",
        f"images: {results['images']}",
        f"windows: {results['proposals']}",
        f"SPP scales: 1-scale {results['scales_1scale']}, 5-scale {results['scales_5scale']}; pyramid "
        f"{results['pyramid']}; fc6/fc7 width {results['fc_dim']} in {results['fc_dtype']}; channels-last convs "
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
        f"{results['matmul']['dtype']} matmul {'x'.join(map(str, results['matmul']['shape_mkn']))}: "
        f"{results['matmul_gflops']:.1f} GFLOP/s;"
        f" SPP 1-scale fc6+fc7: {modes['spp_1scale']['gflops_per_s']['fc']:.1f} GFLOP/s = "
        f"{100 * results['fc_fraction_of_matmul_peak']:.0f}% of it",
        f"SPP layer alone ({pooling['windows']} windows, {pooling['map_hw'][0]}x{pooling['map_hw'][1]} conv5 map at "
        f"{pooling['scale']}): spp.spp_pool {pooling['spp_pool_seconds']:.4f} s vs roi_pool per level "
        f"{pooling['roi_pool_per_level_seconds']:.4f} s ({pooling['speedup']:.1f}x, max |diff| "
        f"{pooling['max_abs_difference']:.2g})",
        f"paper (Table 10, Caffe on a GPU, ZF-5): conv R-CNN {paper['rcnn_conv_s']} s vs SPP "
        f"{paper['spp_1scale_conv_s']} / {paper['spp_5scale_conv_s']} s ({paper['speedup_conv_1scale']}x / "
        f"{paper['speedup_conv_5scale']}x), fc "
        f"{paper['spp_fc_s']} s, overall {paper['speedup_total_1scale']}x / {paper['speedup_total_5scale']}x",
    ]
    return "\n".join(lines)


__all__ = ["FlopCounter", "PhaseTimer", "matmul_gflops", "spp_window_features", "SppPathInfo", "random_boxes",
           "bench_inputs", "bench_model", "BenchInputs", "run", "format_report", "PAPER_TABLE10"]

