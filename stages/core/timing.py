"""Seconds per phase: ``PhaseTimer`` (spp bench's conv / pool / fc; spp detect's and ``Detector``'s profile) and
``profile``, the record of where a detection run's time went.

A detection profile (``spp detect``'s manifest metrics, ``detections.json``) holds, for disjoint phases that
together make up the run's wall time from process start to the last file written:

- ``startup``: process start (``sppcli``'s import, else the call) to the first image, model loading excluded;
- ``load``: the trained models (and, for a split, its proposals and feature cache) opened;
- per image: ``read`` (conv5 maps from HDF5, or the image decoded), ``selective_search``, ``conv`` (conv5 maps
  computed live), ``pool`` (scale choice, window -> cells, SPP), ``fc`` (fc6/fc7), ``score`` (SVMs or fc8
  softmax), ``nms``, ``bbox`` (box regression and clipping), ``write`` (drawn images, comp4 and result files).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from .errors import SppError

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
ONCE_PHASES = ("startup", "load")  # paid once per process, not per image
IMAGE_PHASES = ("read", "selective_search", "conv", "pool", "fc", "score", "nms", "bbox", "write")


class PhaseTimer:
    """``with timer("conv"): ...`` accumulates seconds per phase; synchronises CUDA at both ends so the time
    covers the work, not just its launch.

    ``clock="wall"``: elapsed time (what a user waits). ``clock="cpu"``: this process's CPU time, which on a
    machine shared with other jobs is still the cost of the work itself; meaningful with one thread (more threads
    add their spin-waiting) and on a CPU device only.
    """

    def __init__(self, device: torch.device | str = "cpu", clock: str = "wall"):
        self.device = torch.device(device)
        if clock not in CLOCKS or (clock == "cpu" and self.device.type != "cpu"):
            raise SppError(f"clock {clock!r} is not available on {self.device.type} (use wall, or cpu on a CPU)")
        self.clock = clock
        self.now = CLOCKS[clock]
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # what the time was spent on, e.g. windows scored

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

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` measured elsewhere (e.g. model loading before this timer existed) under ``name``."""
        self.seconds[name] += float(seconds)

    def count(self, name: str, amount: int) -> None:
        self.counts[name] += int(amount)


def no_timer(_name: str) -> contextlib.AbstractContextManager:
    """A ``PhaseTimer``'s call signature that times nothing (the default where no profile is asked for)."""
    return contextlib.nullcontext()


def profile(timer: PhaseTimer, images: int, total_s: float) -> dict:
    """Where a detection run's ``total_s`` went (see the module doc): ``{"seconds": {phase: s}, "images": n,
    "per_image": {phase: s / n}, "total_s", "first_image_s" (process start to the first image: startup + load),
    "per_image_s" (the per-image phases' sum / n), "unaccounted_s" (total minus every phase), "counts"
    (``{"windows": scored, "fc_windows": distinct ones through fc}``; with ``detect.test_flip`` each window is
    scored twice and counted twice), "clock"}``."""
    known = (*ONCE_PHASES, *IMAGE_PHASES)
    seconds = {name: float(timer.seconds.get(name, 0.0)) for name in known}
    seconds.update({name: float(s) for name, s in timer.seconds.items() if name not in seconds})
    per_image_total = sum(s for name, s in seconds.items() if name not in ONCE_PHASES)
    count = max(int(images), 1)
    return {"seconds": seconds, "images": int(images),
            "per_image": {name: s / count for name, s in seconds.items() if name not in ONCE_PHASES},
            "total_s": float(total_s), "first_image_s": seconds["startup"] + seconds["load"],
            "per_image_s": per_image_total / count, "unaccounted_s": float(total_s) - sum(seconds.values()),
            "counts": dict(timer.counts), "clock": timer.clock}


def profile_line(prof: dict) -> str:
    """One printed line: start-up, then per-image seconds of the phases that took any time."""
    parts = [f"{name} {s:.3f}" for name, s in prof["per_image"].items() if s >= 0.0005]
    return (f"profile: {prof['first_image_s']:.2f} s to the first image (load {prof['seconds']['load']:.2f}); "
            f"{prof['per_image_s']:.3f} s/img: {', '.join(parts) or '-'}")
