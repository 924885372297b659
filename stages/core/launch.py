"""Several processes on one stage (``torchrun``): where this process sits (``process_shard``), how rank 0 waits
for the files of the others (``wait_for_files``), and how a command runs itself again under torchrun
(``torchrun_command``, ``relaunch``: ``spp <command> --nproc-per-node N``).

Sharded stages (extract-features, proposals) need no process group: rank r of W takes the images ``r::W``, writes
its own file, and rank 0 polls until every other rank's file is finished, because a resumed rank can finish hours
before the others, past any ``torch.distributed`` barrier timeout. pretrain (DistributedDataParallel) does
initialise a process group (``stages/pretrain/ranks.py``).

Launching: torchrun's own options are parsed with abbreviations, so ``torchrun ... spp pretrain --run X`` fails
(``--run`` could be torchrun's ``--run-path``); a ``--`` before the command ends torchrun's options. Nothing here
imports torch: the proposals stage and its worker processes stay free of it.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import SppError

# torchrun's command line for ``nproc`` processes on this machine; ``--`` ends torchrun's own options.
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


def under_torchrun() -> bool:
    """This process is one of torchrun's workers (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ


def process_shard() -> tuple[int, int]:
    """(rank, world_size) of this process: torch.distributed when initialised, else torchrun's env vars."""
    distributed = sys.modules.get("torch.distributed")  # only when torch is loaded already: never import it here
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise SppError(f"RANK/WORLD_SIZE must be integers, got {os.environ.get('RANK')!r}/"
                       f"{os.environ.get('WORLD_SIZE')!r}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise SppError(f"invalid torchrun rank {rank} of world size {world_size}")
    return rank, world_size


def local_processes() -> int:
    """How many ranks share this machine (torchrun's LOCAL_WORLD_SIZE; 1 in a plain run)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launch_id() -> str | None:
    """What tells this torchrun launch from an earlier one: ``--standalone`` gives every launch a fresh
    rendezvous id (a uuid), and a worker restarted by torchrun counts its restarts. None when the launch has no
    id of its own (torchrun's default id ``none``): then a file left by an earlier launch cannot be told apart."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id in ("", "none"):
        return None
    return f"{run_id}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def wait_for_files(paths: Sequence[Path], ready: Callable[[Path], bool], poll_s: float = 2.0,
                   timeout_s: float | None = None, on_wait: Callable[[list[Path]], None] | None = None) -> None:
    """Block until ``ready(path)`` holds for every path (torchrun rank 0 waiting for the other ranks' files)."""
    start = time.monotonic()
    announced = False
    while True:
        pending = [p for p in paths if not ready(p)]
        if not pending:
            return
        if on_wait is not None and not announced:
            on_wait(pending)
            announced = True
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SppError(f"timed out after {timeout_s:.0f} s waiting for the other ranks' files: "
                           + ", ".join(p.name for p in pending), pending[0])
        time.sleep(poll_s)


# -- running a command again under torchrun ----------------------------------------------------------------------
def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m -- <module> <args>``."""
    if nproc < 1:
        raise SppError(f"the process count must be 1 or more, got {nproc}")
    return [*TORCHRUN, f"--nproc-per-node={nproc}", "-m", "--", module, *args]


def relaunch(nproc: int, module: str, args: Sequence[str]) -> int:
    """Run ``python -m <module> <args>`` in ``nproc`` torchrun workers (each sees WORLD_SIZE and runs its share),
    with this process's stdout/stderr; returns torchrun's exit status (128 + n for a signal n).

    CPU threads: OMP_NUM_THREADS, when unset, becomes the cores divided among the workers (torchrun would set 1).
    Ctrl-C reaches torchrun with this process (same process group), and SIGTERM is passed on: torchrun then
    stops its workers, so none is left behind."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    spec = importlib.util.find_spec(module)  # the workers import the very package this process runs
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    process = subprocess.Popen(torchrun_command(nproc, module, args), env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:  # torchrun got the same Ctrl-C and is stopping its workers: wait for it
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 - code if code < 0 else code
