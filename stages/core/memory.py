"""How this process's C allocator hands out large blocks, for the inference stages (``spp extract-features``,
``spp detect``, ``spp bench``).

glibc's malloc serves each block above 128 KiB (up to 32 MiB, as it adapts) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so every per-image tensor of tens of MB (conv activations, pooled rows, fc6/fc7
activations) arrives as fresh pages that the kernel faults in and zeroes one 4 KiB page at a time: 8,000 page
faults and 16 ms of kernel time per image in fc6+fc7 alone (ZF-5, 1,661 windows, 2 cores), and conv 1.7x slower
(ZF-5 in ``spp bench``; MobileNetV2's conv5 maps at 688 px 1.5x; docs/BENCHMARKS.md). ``keep_freed_memory`` has malloc serve blocks up to 1 GiB from its heap and keep up to 1 GiB
freed at the heap's top, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc.

The cost: freed memory stays with the process until it exits, the heap's free top up to 1 GiB and any hole below
a block still in use, so a long run can hold about its peak memory (plus fragmentation) after the peak has passed.
``SPP_KEEP_FREED_MEMORY=0`` in the environment leaves glibc's default. Nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import os
import sys

KEPT_BYTES = 1 << 30
ENV_SWITCH = "SPP_KEEP_FREED_MEMORY"  # "0": leave the allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_kept: list[int] = []  # the limit in force, once set


def kept_bytes() -> int:
    """The limit ``keep_freed_memory`` set in this process, 0 if it never took effect (what bench records)."""
    return _kept[-1] if _kept else 0


def keep_freed_memory(limit: int = KEPT_BYTES) -> bool:
    """Blocks up to ``limit`` bytes from malloc's heap and up to ``limit`` freed bytes kept for reuse, for the rest
    of the process. True where both settings took effect (glibc); False where the environment turns it off
    (``SPP_KEEP_FREED_MEMORY=0``) or the C library has no ``mallopt`` (musl, macOS, Windows)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both, each on its own: the trim threshold alone still keeps the freed top of the heap.
    trim = bool(mallopt(_M_TRIM_THRESHOLD, int(limit)))
    mmap = bool(mallopt(_M_MMAP_THRESHOLD, int(limit)))
    if trim and mmap:
        _kept.append(int(limit))
    return trim and mmap
