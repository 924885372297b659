"""``spp bench``, its instruments: ``FlopCounter`` (FLOPs of every conv and fc layer run, from forward hooks),
``PhaseTimer`` (seconds per phase, wall or CPU clock, CUDA synchronised), ``matmul_gflops`` (the device's GEMM
rate, the reference for the fc layers), the speed settings every mode runs under, and ``_Setup``, what every
timed run shares.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear  # detect.fc_compression = "int8"

from ..core import nets
from ..core.errors import SppError

CPU_MATMUL_SHAPE = (2048, 4096, 4096)  # (M, K, N): about the fc7 GEMM of 2000 windows
CUDA_MATMUL_SHAPE = (8192, 8192, 8192)
MODES = ("rcnn", "spp_1scale", "spp_5scale")
MODE_NAMES = {"rcnn": "R-CNN", "spp_1scale": "SPP 1-scale", "spp_5scale": "SPP 5-scale"}
PHASES = ("conv", "pool", "fc")


class FlopCounter:
    """Counts the FLOPs (2 x multiply-adds) of every ``nn.Conv2d`` and ``nn.Linear`` (int8 ones too: their integer
    multiply-adds) run inside ``with``, from the layer shapes and each call's output size, through forward hooks;
    grouped by the ``groups`` each layer is in.

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
        if isinstance(module, (nn.Linear, Int8Linear)):  # each output element: in_features multiply-adds
            return 2 * output.numel() * module.in_features
        return 0

    def __enter__(self) -> "FlopCounter":
        for group, root in self.groups.items():
            for name, module in root.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear, Int8Linear)):
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
    formats."""

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
