"""torchrun workers that train one model together (DistributedDataParallel): where this process sits
(``join_ranks``: the device of its local rank, the process group) and the few collectives the training loops of
pretrain and finetune share. In a plain run (no WORLD_SIZE) this is rank 0 of 1 and every helper is the identity.
(Sharded stages need no process group: ``launch.py``.)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import nets


@dataclass
class Ranks:
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


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``cfg.device`` via nets; a torchrun worker takes the GPU of its local rank."""
    device = nets.resolve_device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def join_ranks(preference: str) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=pick_device(preference, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def leave_ranks(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def ranks_joined(preference: str):
    """``join_ranks`` for the body of a ``with``, and ``leave_ranks`` however it ends: a stage's ``run``."""
    ranks = join_ranks(preference)
    try:
        yield ranks
    finally:
        leave_ranks(ranks)


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Sum small per-rank statistics over all ranks (float64: counts below 2**53 stay exact)."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def main_decides(flag: bool, ranks: Ranks) -> bool:
    """Rank 0's ``flag`` on every rank (a decision taken from rank 0's clock, such as "save a checkpoint now")."""
    if not ranks.distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=ranks.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather_objects(mine, ranks: Ranks) -> list:
    """Every rank's picklable ``mine``, in rank order, on every rank."""
    if not ranks.distributed:
        return [mine]
    everyone: list = [None] * ranks.world
    dist.all_gather_object(everyone, mine)
    return everyone


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
