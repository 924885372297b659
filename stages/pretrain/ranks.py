"""``spp pretrain``, where this process sits: a plain run (rank 0 of 1) or one ``torchrun`` worker
(``_join_ranks``: device per local rank, the process group), sums over the ranks, and every random stream
(torch, CUDA, NumPy, Python) that a resumable checkpoint carries for each rank.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..core import nets


# -- distributed context ------------------------------------------------------------------------------------------
@dataclass
class _Ranks:
    """Where this process sits: plain (rank 0 of 1) or one torchrun worker."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this stage created the process group, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    """``cfg.device`` via nets; a torchrun worker takes the GPU of its local rank."""
    device = nets.resolve_device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _join_ranks(preference: str) -> _Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Ranks(device=_pick_device(preference, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def _all_sum(values: list[float], ranks: _Ranks) -> list[float]:
    """Sum small per-rank statistics over all ranks (identity in a plain run)."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# -- RNG state (every rank's streams travel in the checkpoint) ----------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _gather_rng_states(ranks: _Ranks) -> list[dict]:
    mine = _rng_state(ranks.device)
    if not ranks.distributed:
        return [mine]
    everyone: list = [None] * ranks.world
    dist.all_gather_object(everyone, mine)
    return everyone
