"""``spp bench``, its instruments: ``FlopCounter`` (FLOPs of every conv and fc layer run, from forward hooks),
``PhaseTimer`` (seconds per phase, wall or CPU clock, CUDA synchronised; from ``core.timing``, which spp detect
profiles with too), ``matmul_gflops`` / ``matmul_peak`` (the device's GEMM peak per type, the reference for the
fc layers: the best of repeats, at the fc layers' own shapes and a large square one), the speed settings every
mode runs under, and ``_Setup``, what every timed run shares.
"""
from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import fccompress, fcfeatures, nets, quant
from ..core.errors import SppError
from ..core.timing import CLOCKS, PhaseTimer  # noqa: F401 (bench's instruments; detect profiles with it too)

# (M, K, N) of the large square GEMM in the matmul peak; the fc layers' own shapes are measured beside it
CPU_MATMUL_SHAPE = (4096, 4096, 4096)
CUDA_MATMUL_SHAPE = (8192, 8192, 8192)
PEAK_WARMUPS, PEAK_REPEATS = 1, 3  # per GEMM: untimed calls, then the timed ones whose best counts
# How long the peak's GEMM is also run back to back, for the rate it holds (``sustained_gflops``): on the 2-core
# AMX machine bfloat16 and int8 GEMMs fall from their best call to about 40% of it within a few seconds.
SUSTAINED_SECONDS = 6.0
# The kernels of each type's peak: fc6/fc7's own (nn.Linear's x @ W^T + b; the dynamic int8 layer) and the
# plain ones (a [M,K] @ [K,N] matmul; int8 x int8 -> int32 ``torch._int_mm``).
GEMM_KERNELS = {"float32": ("linear", "mm"), "bfloat16": ("linear", "mm"), "int8": ("int_mm", "int8_linear")}
MODES = ("rcnn", "spp_1scale", "spp_5scale")
MODE_NAMES = {"rcnn": "R-CNN", "spp_1scale": "SPP 1-scale", "spp_5scale": "SPP 5-scale"}
PHASES = ("conv", "pool", "fc")


class FlopCounter:
    """Counts the FLOPs (2 x multiply-adds) of every ``nn.Conv2d`` and ``nn.Linear`` (int8 ones too: their integer
    multiply-adds) run inside ``with``, from the layer shapes and each call's output size, through forward hooks;
    grouped by the ``groups`` each layer is in.

    ``with FlopCounter({"conv": backbone, "fc": head}) as counter: ...`` then ``counter.flops["conv"]`` and
    ``counter.by_layer["conv.body.conv1"]``. Bias additions, activations, LRN and pooling are not counted, nor the
    zero rows ``fcfeatures.head_rows`` pads a bfloat16 batch with.
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
        if isinstance(module, (nn.Linear, *fccompress.INT8_LAYERS)):  # each output element: in_features mult-adds
            rows = output.numel() // module.out_features - fcfeatures.padding_rows()  # not head_rows' padding
            return 2 * rows * module.out_features * module.in_features
        return 0

    def __enter__(self) -> "FlopCounter":
        for group, root in self.groups.items():
            for name, module in root.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear, *fccompress.INT8_LAYERS)):
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


def _operands(kernel: str, shape: tuple[int, int, int], dtype: str, device: torch.device):
    """The GEMM ``kernel`` of ``shape`` (M, K, N) on seeded random operands, as a call with no arguments."""
    m, k, n = shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    if kernel == "int_mm":  # int8 x int8 -> int32; the weight laid out as nn.Linear's, [N, K]
        a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8).to(device)
        weight = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8).to(device)
        return lambda: torch._int_mm(a, weight.t())
    x = torch.randn(m, k, generator=generator).to(device)
    if kernel == "int8_linear":  # the int8 layer the int8 fc variant runs, on its own input
        layer = nn.utils.skip_init(nn.Linear, k, n)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, generator=generator) * 0.01)
            layer.bias.zero_()
        if fccompress.int8_engine() == "onednn":  # uint8 rows in, as SPP pools them
            rows = quant.quantize_rows(x.relu())
            int8_layer = fccompress.Int8LinearReLU(layer)
            return lambda: int8_layer(rows)
        quantized = fccompress.quantize_int8(nn.Sequential(layer), layers=("0",))[0]  # float input, per batch
        return lambda: quantized(x)
    x = x.to(getattr(torch, dtype))
    if kernel == "linear":  # what fc6/fc7 run: x @ W^T + b, W [N, K]
        weight = torch.randn(n, k, generator=generator).to(device=device, dtype=x.dtype)
        bias = torch.randn(n, generator=generator).to(device=device, dtype=x.dtype)
        return lambda: F.linear(x, weight, bias)
    if kernel == "mm":
        b = torch.randn(k, n, generator=generator).to(device=device, dtype=x.dtype)
        out = torch.empty(m, n, device=device, dtype=x.dtype)
        return lambda: torch.mm(x, b, out=out)
    known = sorted({name for names in GEMM_KERNELS.values() for name in names})
    raise ValueError(f"unknown GEMM kernel {kernel!r} (known: {', '.join(known)})")


def matmul_gflops(device: torch.device, shape: tuple[int, int, int] | None = None, repeats: int = PEAK_REPEATS,
                  dtype: torch.dtype | str = torch.float32, clock: str = "wall", *, kernel: str = "mm",
                  warmups: int = PEAK_WARMUPS) -> dict:
    """One GEMM's rate: 2 M K N FLOPs over the **best** of ``repeats`` timed calls after ``warmups`` untimed ones
    (library initialisation, kernel choice, weight packing), in the thread and precision settings in force (run
    it inside ``_speed_settings``, as the modes; float32 uses TF32 on CUDA when they allow it, as fc6/fc7 do).

    ``kernel``: "linear" (nn.Linear's ``x @ W^T + b``, what fc6/fc7 run), "mm" (``[M,K] @ [K,N]``), "int_mm"
    (int8 x int8 -> int32) or "int8_linear" (the dynamic int8 linear layer); ``dtype`` is int8 for the last two.
    The best, not the median: a GEMM never runs faster than the machine allows, while a busy moment only makes
    one call slower, so the best call is the one that measures the machine."""
    device = torch.device(device)
    dtype = str(dtype).replace("torch.", "")
    m, k, n = shape or (CUDA_MATMUL_SHAPE if device.type == "cuda" else CPU_MATMUL_SHAPE)
    timer = PhaseTimer(device, clock)
    seconds = []
    with torch.inference_mode():
        call = _operands(kernel, (m, k, n), dtype, device)
        for _ in range(max(0, warmups)):
            call()
        for _ in range(max(1, repeats)):
            timer.seconds.clear()
            with timer("gemm"):
                call()
            seconds.append(timer.seconds["gemm"])
    flops = 2.0 * m * k * n
    best, median = min(seconds), statistics.median(seconds)
    return {"shape_mkn": [m, k, n], "dtype": dtype, "kernel": kernel, "seconds": best,
            "gflops": flops / best / 1e9 if best > 0 else float("inf"),
            "median_gflops": flops / median / 1e9 if median > 0 else float("inf"),
            "repeats": len(seconds), "warmups": max(0, warmups), "threads": torch.get_num_threads()}


def sustained_gflops(device: torch.device, dtype: str, shape: tuple[int, int, int], kernel: str,
                     seconds: float = SUSTAINED_SECONDS, clock: str = "wall") -> dict:
    """The rate one GEMM holds when called back to back for ``seconds`` (after a warm-up call): all calls' FLOPs
    over their summed time, and the rate in each fifth of that time (the calls whose middle falls in it; None for
    a fifth without one). The peak is one best call; a machine that cannot hold that rate (power or thermal
    limits, other tenants) gives a lower one here, and no fc layer, fed however well, runs faster than this for
    long."""
    device = torch.device(device)
    m, k, n = shape
    timer = PhaseTimer(device, clock)
    calls: list[float] = []
    total = 0.0
    with torch.inference_mode():
        call = _operands(kernel, (m, k, n), dtype, device)
        call()
        while total < seconds or not calls:
            timer.seconds.clear()
            with timer("gemm"):
                call()
            calls.append(timer.seconds["gemm"])
            total += calls[-1]
    flops = 2.0 * m * k * n
    spent = np.asarray(calls)
    middles = np.cumsum(spent) - spent / 2
    fifth = np.minimum((middles / total * 5).astype(np.int64), 4) if total > 0 else np.zeros(len(spent), np.int64)
    by_fifth = []
    for part in range(5):
        chosen = spent[fifth == part]
        by_fifth.append(flops * len(chosen) / float(chosen.sum()) / 1e9 if chosen.sum() > 0 else None)
    return {"shape_mkn": [m, k, n], "kernel": kernel, "seconds": total, "calls": len(calls),
            "gflops": flops * len(calls) / total / 1e9 if total > 0 else float("inf"), "gflops_by_fifth": by_fifth}


def peak_dtype(compression: str, fc_dtype: str) -> str:
    """The GEMM type an fc variant's layers run in: int8 for int8 layers, else its fc dtype (an SVD's two
    smaller layers are ordinary float GEMMs)."""
    return "int8" if compression == "int8" else fc_dtype


def matmul_peak(device: torch.device, dtype: str, shapes: dict[str, tuple[int, int, int]], clock: str = "wall",
                repeats: int = PEAK_REPEATS, warmups: int = PEAK_WARMUPS, previous: dict | None = None,
                when: str = "", sustained_seconds: float = 0.0) -> dict:
    """The machine's GEMM peak in ``dtype``: the best ``matmul_gflops`` over ``shapes`` (name -> (M, K, N): the
    fc layers' own and a large square one) and ``GEMM_KERNELS[dtype]`` ("mm" on the "square" shape only: fc
    never runs it). ``previous``: an earlier ``matmul_peak`` of the same dtype whose measurements are kept, so
    that a peak taken before and after the timed runs is the best of both (``when`` labels them).

    Returns ``{"dtype", "gflops" (the peak; None when no kernel ran), "best": {"shape", "shape_mkn", "kernel",
    "when"}, "entries": [every measurement], "unavailable": {kernel: why}}`` (an int8 GEMM may be missing from a
    build or device; ``not_measured`` then says why when none ran), and with ``sustained_seconds`` > 0,
    ``"sustained"``: ``sustained_gflops`` of the best entry's GEMM (a ``previous`` one is kept when not rerun)."""
    entries = list(previous["entries"]) if previous else []
    unavailable = dict(previous.get("unavailable", {})) if previous else {}
    for name, shape in shapes.items():
        for kernel in GEMM_KERNELS[dtype]:
            if kernel == "mm" and name != "square":
                continue
            try:
                measured = matmul_gflops(device, shape, repeats, dtype, clock, kernel=kernel, warmups=warmups)
            except (RuntimeError, NotImplementedError, SppError) as exc:  # e.g. no int8 GEMM on this device
                unavailable[kernel] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                continue
            entries.append({"shape": name, "when": when, **measured})
    result = {"dtype": dtype, "gflops": None, "entries": entries, "unavailable": unavailable}
    if entries:
        best = max(entries, key=lambda entry: entry["gflops"])
        result.update(gflops=best["gflops"], best={key: best[key] for key in ("shape", "shape_mkn", "kernel", "when")})
        if sustained_seconds > 0:
            result["sustained"] = {"when": when, **sustained_gflops(device, dtype, tuple(best["shape_mkn"]),
                                                                   best["kernel"], sustained_seconds, clock)}
        elif previous and "sustained" in previous:
            result["sustained"] = previous["sustained"]
    else:
        result["not_measured"] = "; ".join(f"{k}: {why}" for k, why in unavailable.items()) or "no GEMM kernel"
    return result


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


@dataclass
class _Setup:
    """What every timed run shares: the modules (``head`` may be a bfloat16 or compressed copy), scales, sizes,
    formats. ``heads``: every fc variant timed in every mode (name -> head, ``head`` among them as ``selected``);
    empty: ``head`` alone."""

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
    heads: dict[str, nn.Module] = field(default_factory=dict)
    selected: str = "float32"

    def fc_heads(self) -> dict[str, nn.Module]:
        return self.heads or {self.selected: self.head}


def time_fc(setup: _Setup, rows: torch.Tensor | dict, timer: PhaseTimer, turn: int = 0) -> None:
    """fc6+fc7 of pooled ``rows`` through every fc variant's head, each timed as phase "fc:<name>" and the selected
    one also as "fc", with detect's fc path (``fcfeatures.head_rows``: batches converted to the head's type,
    float32 out) in every mode, so R-CNN and SPP mode differ only in the rows they feed it. The order rotates
    with ``turn``, so that no variant always comes first after conv and pooling have filled the caches.

    ``rows``: float32 rows, or ``{"float32": rows, "uint8": QuantizedRows}`` when pooling made both: an int8 head
    (``input_dtype`` uint8) takes the uint8 ones, and its pooling phase ("pool:<name>") is "pool:uint8", every
    other variant's "pool:float32"; "pool" becomes the selected variant's. Float rows alone: every variant's
    pooling is "pool", and an int8 head quantizes them per batch inside its fc time."""
    by_kind = rows if isinstance(rows, dict) else {"float32": rows}
    heads = list(setup.fc_heads().items())
    shift = turn % len(heads)
    for name, head in heads[shift:] + heads[:shift]:
        kind = "uint8" if head.input_dtype == torch.uint8 and "uint8" in by_kind else "float32"
        with timer(f"fc:{name}"):
            fcfeatures.head_rows(head, by_kind[kind], "fc7", setup.fc_batch)
        pool_phase = f"pool:{kind}"
        timer.seconds[f"pool:{name}"] = timer.seconds[pool_phase if pool_phase in timer.seconds else "pool"]
    timer.seconds["fc"] = timer.seconds[f"fc:{setup.selected}"]
    timer.seconds["pool"] = timer.seconds[f"pool:{setup.selected}"]
