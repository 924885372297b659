"""``spp proposals``, its workers: ``_propose_one`` (selective search on one image, in a worker process, with
the image's own seed) and ``_map_images``, which runs it over a list of images in this process (one worker) or
in a spawn pool, yielding results in completion order.
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Iterator

import numpy as np

from ..core.config import ProposalConfig
from ..core.errors import SppError
from ..core.proposals import image_seed, selective_search
from ..core.voc import VocDataset


# -- worker side --------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(devkit_root: str, params: ProposalConfig, seed: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per worker process: the pool provides the parallelism
    _WORKER.update(dataset=VocDataset(devkit_root), params=params, seed=seed)


def _propose_one(image_id: str) -> tuple[str, np.ndarray | None, str | None, float]:
    """Worker task: (image_id, boxes float32 [N, 4] or None, error message or None, CPU seconds it took).
    CPU time, unlike wall time, does not grow when other processes share the cores."""
    import cv2

    start = time.process_time()
    try:
        image = _WORKER["dataset"].load_image(image_id)
        boxes = selective_search(image, _WORKER["params"], image_seed(_WORKER["seed"], image_id))
    except SppError as err:
        return image_id, None, str(err), time.process_time() - start
    except cv2.error as err:
        path = _WORKER["dataset"].image_path(image_id)
        return image_id, None, f"{path}: selective search failed ({' '.join(str(err).split())})", 0.0
    return image_id, boxes.astype(np.float32), None, time.process_time() - start


def _map_images(dataset: VocDataset, cfg, image_ids: list[str], workers: int) -> Iterator[tuple]:
    """Run ``_propose_one`` over ``image_ids``: in this process for one worker, else in a spawn pool (results in
    completion order). Leaving the generator early (an error, Ctrl-C) terminates the pool."""
    initargs = (str(dataset.devkit_root), cfg.proposals, cfg.seed)
    if workers == 1:
        import cv2

        threads = cv2.getNumThreads()
        _init_worker(*initargs)
        try:
            for image_id in image_ids:
                yield _propose_one(image_id)
        finally:
            cv2.setNumThreads(threads)
            _WORKER.clear()
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap_unordered(_propose_one, image_ids, chunksize=1)
