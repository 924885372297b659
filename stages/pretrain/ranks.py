"""``spp pretrain``, every random stream (torch, CUDA, NumPy, Python) that a resumable checkpoint carries for each
torchrun rank (the rank context itself, ``Ranks``, is ``stages.core.ranks``'s, shared with finetune).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..core.ranks import Ranks, gather_objects


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


def _gather_rng_states(ranks: Ranks) -> list[dict]:
    return gather_objects(_rng_state(ranks.device), ranks)
