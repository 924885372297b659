"""How this process's C allocator hands out large blocks, for the inference stages (``spp detect``, ``spp bench``).

glibc's malloc serves each block above 128 KiB with a fresh ``mmap`` and returns it with ``munmap`` when freed, so
every per-image tensor of tens of MB (pooled rows, fc6/fc7 activations) arrives as fresh pages that the kernel
faults in and zeroes one 4 KiB page at a time: 8,000 page faults and 16 ms of kernel time per image in fc6+fc7
alone (ZF-5, 1,661 windows, 2 cores). ``keep_freed_memory`` has malloc serve blocks up to 1 GiB from its heap and
keep up to 1 GiB of freed memory for the next ones, as PyTorch's own CPU tuning guide does with jemalloc or
tcmalloc. The cost: memory freed stays with the process (at most 1 GiB beyond what it uses) until it exits.
Nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

KEPT_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_kept: list[int] = []  # the limit in force, once set


def kept_bytes() -> int:
    """The limit ``keep_freed_memory`` set in this process, 0 if it never took effect (what bench records)."""
    return _kept[-1] if _kept else 0


def keep_freed_memory(limit: int = KEPT_BYTES) -> bool:
    """Blocks up to ``limit`` bytes from malloc's heap and up to ``limit`` freed bytes kept for reuse, for the rest
    of the process. True where it took effect (glibc); False elsewhere, where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt  # glibc; musl has none
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(mallopt(_M_TRIM_THRESHOLD, int(limit)))
    if applied:
        _kept.append(int(limit))
    return applied
