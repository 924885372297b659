"""Hard-negative mining of ``spp train-svm``, pure (no files, no networks): negative pruning, the shared
negative store, the per-class caches and the mining schedule (see the stage's docstring in ``__init__``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core import boxes as box_ops
from ..core import spp
from ..core.config import CHOICES
from ..core.errors import SppError
from ..core.svm import (Rows, SvmFit, fit_memory_bytes, svm_objective)

try:
    import resource  # peak memory in the metrics; Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

SVM_FILE = "svm.npz"
PRUNING_MODES = CHOICES["svm.pruning"]
OVERLAP_PRUNE_IOU = 0.7  # "removed if it overlaps another negative by more than 70%" [P §4.1]
FC_BATCH = 4096  # windows per fc forward
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------ pruning
def dedup_windows(cells: np.ndarray, scale_index: np.ndarray) -> np.ndarray:
    """Rows (ascending) of the first window of each unique (conv5 cell rectangle, scale index): windows that pool
    identical features [S:spp_features_convX_to_poolX.m ``dedup``; MATLAB's ``unique(..., 'rows')`` keeps the
    first occurrence]."""
    return np.sort(spp.distinct_cells(scale_index, cells)[0])


def prune_overlapping(boxes: np.ndarray, threshold: float = OVERLAP_PRUNE_IOU) -> np.ndarray:
    """Rows (ascending) kept by the paper's rule: walking the windows in row order, a window is dropped when its
    IoU with an already kept one exceeds ``threshold``. That is greedy NMS with row order as the score."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = box_ops.nms(boxes, -np.arange(len(boxes), dtype=np.float64), threshold)
    return np.sort(keep).astype(np.int64)


def negative_candidates(overlaps: np.ndarray, boxes: np.ndarray, active: np.ndarray, neg_iou: float, pruning: str,
                        cells: np.ndarray | None = None, scale_index: np.ndarray | None = None) -> np.ndarray:
    """bool [R, K]: row r is a negative candidate of class k (IoU < ``neg_iou`` with every class-k GT, class k
    active, and surviving the pruning). "dedup" needs each row's ``cells`` and ``scale_index``."""
    candidates = np.asarray(overlaps) < neg_iou
    candidates[:, ~np.asarray(active, dtype=bool)] = False
    if pruning == "dedup":
        if cells is None or scale_index is None:
            raise ValueError("dedup pruning needs the windows' conv5 cells and scale indices")
        unique = np.zeros(len(candidates), dtype=bool)
        unique[dedup_windows(cells, scale_index)] = True
        candidates &= unique[:, None]
    elif pruning == "overlap70":
        for k in np.flatnonzero(candidates.any(axis=0)):
            rows = np.flatnonzero(candidates[:, k])
            column = np.zeros(len(candidates), dtype=bool)
            column[rows[prune_overlapping(boxes[rows])]] = True
            candidates[:, k] = column
    elif pruning != "none":
        raise SppError(f"unknown svm.pruning {pruning!r} (known: {', '.join(PRUNING_MODES)})")
    return candidates


# ------------------------------------------------------------------------------------------------ mining
@dataclass(frozen=True)
class MiningSchedule:
    hard_thresh: float = -1.0001  # add negatives scoring above this
    evict_thresh: float = -1.2  # after a retrain, drop cached negatives scoring below this
    retrain_limit: int = 2000  # retrain when more than this many negatives were added since the last one


@dataclass
class ImageNegatives:
    """One image's negative candidates for every class, features already scaled."""

    image_index: int
    features: np.ndarray  # float32 [M, D]
    rows: np.ndarray  # int64 [M]: the roidb row of each feature; (image_index, row) is the cache key
    candidates: np.ndarray  # bool [M, K]


@dataclass
class Retrain:
    """One retrain of one class: when, on how much, with what result."""

    image_index: int
    negatives: int  # negatives in the training set of this fit
    evicted: int
    objective: dict
    n_iter: int
    converged: bool


# The cache of hard negatives. Every class used to keep its own float32 copy of each negative it cached; but image 1
# adds every negative window to all classes and later hard negatives are mostly shared between classes, so a wide
# feature (pool5 of a 320-channel trunk: 16,000-d) needed many times the memory of the distinct windows. Now one
# store holds each window's features once and the classes hold ids into it.
COMPACT_DEAD_FRACTION = 0.25  # reclaim the rows no class holds once they are this share of the store (amortised)


class NegativeStore:
    """The features of the cached negatives: one float32 row per window (image_index, row), however many classes
    hold it. ``add`` stores a batch (one image's new windows) as a block; a row's id is its position in the blocks
    laid end to end. ``holders`` counts the classes holding each row; a row none holds any more is dead, and
    ``compact`` frees the dead rows, renumbering the ids in the same order."""

    def __init__(self, dim: int):
        self.dim = dim
        self.blocks: list[np.ndarray] = []  # float32 [m, D]; one per add, never empty
        self.keys = np.zeros((0, 2), np.int64)  # (image_index, row) of each id
        self.holders = np.zeros(0, np.int32)
        self.nonzeros = np.zeros(0, np.int64)  # nonzero values of each row: liblinear copies these (fit memory)
        self._starts = np.zeros(1, np.int64)  # first id of each block, then the number of ids
        self._id_of: dict[tuple[int, int], int] = {}  # live rows only

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self.blocks)

    @property
    def row_bytes(self) -> int:
        return 4 * self.dim

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The id of each live (image_index, row) key, -1 where it is not stored."""
        return np.array([self._id_of.get((int(i), int(r)), -1) for i, r in keys], dtype=np.int64).reshape(-1)

    def add(self, features: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Store new windows (none held yet); returns their ids."""
        first = len(self)
        # C-contiguous: the dense solver reads the rows in place
        self.blocks.append(np.ascontiguousarray(np.asarray(features, dtype=np.float32).reshape(-1, self.dim)))
        self.keys = np.concatenate([self.keys, keys])
        self.holders = np.concatenate([self.holders, np.zeros(len(keys), np.int32)])
        self.nonzeros = np.concatenate([self.nonzeros, np.count_nonzero(self.blocks[-1], axis=1)])
        self._starts = np.append(self._starts, len(self))
        ids = np.arange(first, len(self), dtype=np.int64)
        self._id_of.update(zip(map(tuple, keys.tolist()), ids.tolist()))
        return ids

    def hold(self, ids: np.ndarray) -> None:
        np.add.at(self.holders, ids, 1)

    def release(self, ids: np.ndarray) -> None:
        np.add.at(self.holders, ids, -1)
        for i, r in self.keys[ids[self.holders[ids] == 0]].tolist():  # dead now: a later visit stores it afresh
            self._id_of.pop((i, r), None)

    def rows(self, ids: np.ndarray) -> Rows:
        """The rows ``ids``, in that order, named where they lie (no copy). They name the store's own list of
        blocks, which ``compact`` empties: a ``Rows`` left alive cannot keep the old blocks (a second store) alive."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        block = np.searchsorted(self._starts, ids, side="right") - 1
        return Rows(self.blocks or [np.zeros((0, self.dim), np.float32)], block, ids - self._starts[block])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """A float32 [len(ids), D] copy of the rows ``ids``, in that order."""
        return self.rows(ids).gather()

    def blockwise(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, features) of each block."""
        return zip(self._starts[:-1].tolist(), self.blocks)

    def compact(self) -> np.ndarray:
        """Free the dead rows; returns the new id of every old one (-1: freed). Block by block, so the extra memory
        is one block's copy at a time."""
        live = self.holders > 0
        new_ids = np.where(live, np.cumsum(live) - 1, -1)
        blocks = []
        for b, (start, end) in enumerate(zip(self._starts[:-1], self._starts[1:])):
            keep = live[start:end]
            if keep.all():
                blocks.append(self.blocks[b])
            elif keep.any():
                blocks.append(self.blocks[b][keep])
            self.blocks[b] = None  # the old block goes now, not after the loop
        self.blocks = blocks
        self.keys, self.holders, self.nonzeros = self.keys[live], self.holders[live], self.nonzeros[live]
        self._starts = np.concatenate([[0], np.cumsum([len(block) for block in blocks], dtype=np.int64)])
        self._id_of = dict(zip(map(tuple, self.keys.tolist()), range(len(self))))
        return new_ids


@dataclass
class ClassCache:
    positives: np.ndarray  # float32 [P, D]
    store: NegativeStore = field(repr=False)
    ids: list[np.ndarray] = field(default_factory=list)  # int64: store ids of its negatives, in caching order
    key_set: set = field(default_factory=set)  # (image_index, row) of its negatives
    num_added: int = 0
    retrains: list[Retrain] = field(default_factory=list)

    @property
    def num_negatives(self) -> int:
        return sum(len(x) for x in self.ids)

    def negative_ids(self) -> np.ndarray:
        if len(self.ids) != 1:
            self.ids = [np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)]
        return self.ids[0]

    def consolidate(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the cached negatives' features (float32 [n, D]) and their keys [n, 2], in caching order."""
        ids = self.negative_ids()
        return self.store.gather(ids), self.store.keys[ids]


FitFn = Callable[[int, np.ndarray, np.ndarray], SvmFit]


class HardNegativeMiner:
    """The mining schedule over a stream of images, for all classes at once. Pure: no files, no networks.

    ``fit(class_index, X_pos, X_neg) -> SvmFit`` trains one class (``X_neg``: a ``core.svm.Rows`` naming the store's
    rows, not a copy); ``objective(w, b, X_pos, X_neg) -> dict`` evaluates it (both injectable, so the schedule is
    testable with hand-made solvers); ``fit_bytes(rows, dim, nonzeros)``: the memory one fit allocates (the solver's
    ``core.svm.fit_memory_bytes``). With ``workers`` > 1 the
    classes due together call ``fit`` from that many threads at once, so it must be safe for that: liblinear in
    threads is not (see ``core.svm``), ``core.svm.svm_fitter`` is.

    ``max_cache_bytes`` bounds the memory of the negatives (the shared store of their float32 features): past it,
    the easiest are evicted (``_bound_memory``). It also bounds each fit, by its estimated memory (a class whose
    fit would pass it is fitted on its hardest negatives that fit, ``_within_fit_budget``), and caps the fits
    running at once: the stage holds about twice the bound, plus the positives.
    Unreached, it changes nothing: the SVMs are those of unbounded mining, to the bit.
    """

    def __init__(self, positives: Sequence[np.ndarray], fit: FitFn, schedule: MiningSchedule = MiningSchedule(),
                 objective: Callable[..., dict] = svm_objective, workers: int = 1,
                 max_cache_bytes: float = math.inf, fit_bytes: Callable[..., int] = fit_memory_bytes):
        dims = {np.asarray(p).reshape(len(p), -1).shape[1] for p in positives if len(p)}
        if len(dims) != 1:
            raise ValueError(f"positives must share one feature dimension (got {sorted(dims)})")
        self.dim = dims.pop()
        self.store = NegativeStore(self.dim)
        self.caches = [ClassCache(np.asarray(p, dtype=np.float32).reshape(-1, self.dim), self.store)
                       for p in positives]
        self.active = np.array([len(c.positives) > 0 for c in self.caches])
        self.W = np.zeros((self.dim, len(self.caches)), dtype=np.float32)
        self.b = np.zeros(len(self.caches), dtype=np.float32)
        self.trained = np.zeros(len(self.caches), dtype=bool)
        self.fit, self.schedule, self.objective, self.workers = fit, schedule, objective, max(1, int(workers))
        self.max_cache_bytes, self.fit_bytes = float(max_cache_bytes), fit_bytes
        self.first_image = True
        self.added: list[tuple[int, int, int]] = []  # (image_index, class, negatives added)
        self.evicted_for_memory = 0  # windows evicted to keep the store within max_cache_bytes

    def scores(self, features: np.ndarray) -> np.ndarray:
        """[M, K] scores of every class's current model (one matmul)."""
        return np.asarray(features, dtype=np.float32) @ self.W + self.b

    def add_image(self, sample: ImageNegatives, is_last: bool) -> list[int]:
        """Cache the image's (hard) negatives, retrain the classes that are due; returns the retrained classes."""
        candidates = np.asarray(sample.candidates, dtype=bool) & self.active[None, :]
        if not self.first_image and len(sample.features):
            candidates &= self.scores(sample.features) > self.schedule.hard_thresh
        picks = {}  # class -> (rows of the sample it caches, their keys)
        for k in np.flatnonzero(candidates.any(axis=0)):
            picked = np.flatnonzero(candidates[:, k])
            keys = np.column_stack([np.full(len(picked), sample.image_index, np.int64),
                                    np.asarray(sample.rows, dtype=np.int64)[picked]])
            cache = self.caches[k]
            fresh = np.array([(int(i), int(r)) not in cache.key_set for i, r in keys], dtype=bool)
            if fresh.any():
                picks[int(k)] = (picked[fresh], keys[fresh])
        ids_of_rows = self._store(sample, picks)
        for k, (picked, keys) in picks.items():
            cache = self.caches[k]
            cache.ids.append(ids_of_rows[picked])
            self.store.hold(cache.ids[-1])
            cache.key_set.update((int(i), int(r)) for i, r in keys)
            cache.num_added += len(picked)
            self.added.append((sample.image_index, k, len(picked)))
        self._bound_memory()
        due = [k for k, cache in enumerate(self.caches)
               if self.active[k] and cache.num_negatives > 0
               and (self.first_image or cache.num_added > self.schedule.retrain_limit or is_last)]
        self.first_image = False
        if due:
            self._retrain(due, sample.image_index)
        return due

    def _store(self, sample: ImageNegatives, picks: dict) -> np.ndarray:
        """Store id of every sample row some class caches (-1 elsewhere): a window already stored (a class holds
        it) is shared, the others are added once, however many classes take them."""
        ids = np.full(len(sample.rows), -1, np.int64)
        if not picks:
            return ids
        rows = np.unique(np.concatenate([picked for picked, _ in picks.values()]))
        keys = np.column_stack([np.full(len(rows), sample.image_index, np.int64),
                                np.asarray(sample.rows, dtype=np.int64)[rows]])
        ids[rows] = self.store.lookup(keys)
        new = ids[rows] < 0
        if new.any():
            ids[rows[new]] = self.store.add(np.asarray(sample.features[rows[new]], dtype=np.float32), keys[new])
        return ids

    def _bound_memory(self) -> None:
        """Keep the store within ``max_cache_bytes``: free the rows no class holds, then, if still over, evict the
        easiest windows. A window is as hard as it is for its hardest holder (its highest score over the classes
        holding it), and is evicted from all of them: dropping it from some holders only would free nothing. Called
        once an image's new windows are stored, so for a moment the store may pass the bound by those."""
        if self.store.nbytes <= self.max_cache_bytes:
            return
        self._compact()
        excess = self.store.nbytes - self.max_cache_bytes
        if excess <= 0:
            return
        held = np.zeros((len(self.store), len(self.caches)), dtype=bool)
        for k, cache in enumerate(self.caches):
            held[cache.negative_ids(), k] = True
        hardness = np.empty(len(self.store), np.float32)
        for start, block in self.store.blockwise():
            scores = self.scores(block)
            hardness[start:start + len(block)] = np.where(held[start:start + len(block)], scores, -np.inf).max(axis=1)
        count = min(len(self.store), math.ceil(excess / self.store.row_bytes))
        evicted = np.zeros(len(self.store), dtype=bool)
        evicted[np.argsort(hardness, kind="stable")[:count]] = True  # ties: the older window first
        for cache in self.caches:
            ids = cache.negative_ids()
            self._evict(cache, ids, evicted[ids])
        self.evicted_for_memory += count
        self._compact()

    def _evict(self, cache: ClassCache, ids: np.ndarray, gone: np.ndarray) -> None:
        """Drop ``ids[gone]`` from ``cache`` (``ids``: all its negatives) and release them in the store."""
        if gone.any():
            cache.ids = [ids[~gone]]
            cache.key_set.difference_update(map(tuple, self.store.keys[ids[gone]].tolist()))
            self.store.release(ids[gone])

    def _compact(self) -> None:
        new_ids = self.store.compact()
        for cache in self.caches:
            cache.ids = [new_ids[cache.negative_ids()]]

    def _fit_bytes(self, k: int, neg_ids: np.ndarray) -> int:
        """Memory of fitting class k on ``neg_ids``: the fit's own (the rows are passed where they lie)."""
        positives = self.caches[k].positives
        nonzeros = int(np.count_nonzero(positives)) + int(self.store.nonzeros[neg_ids].sum())
        return int(self.fit_bytes(len(positives) + len(neg_ids), self.dim, nonzeros))

    def parallel_fits(self, classes: Sequence[int]) -> int:
        """How many of ``classes`` are fitted at once: up to ``workers``, as many as fit in ``max_cache_bytes`` at the
        size of the largest (at least one). Each running fit holds copies of its training set (``_fit_bytes``), so
        workers multiply them; the fits are independent, so this changes the time, never the SVMs."""
        count = min(self.workers, len(classes))
        if count <= 1 or math.isinf(self.max_cache_bytes):
            return max(count, 1)
        largest = max(self._fit_bytes(k, self.caches[k].negative_ids()) for k in classes)
        return max(1, min(count, int(self.max_cache_bytes // max(largest, 1))))

    def _within_fit_budget(self, k: int, neg_ids: np.ndarray) -> np.ndarray:
        """``neg_ids``, or, when fitting class k on them would pass ``max_cache_bytes`` (``_fit_bytes``: a fit copies
        its training set into float64 and liblinear's nodes, 6x the float32 rows when dense; the dense solver
        copies nothing), the hardest of them
        that fit (highest score of k's current model; ties: the older); not when its positives alone pass it. The
        others leave k's cache, as the store's own eviction does (``evicted_for_memory``). So a fit, like the store,
        stays within the bound: one fit of 16,000-d pool5 took 14 GB beside an 8 GB store before this. Unreached,
        it changes nothing."""
        if math.isinf(self.max_cache_bytes) or self._fit_bytes(k, neg_ids) <= self.max_cache_bytes:
            return neg_ids
        cache = self.caches[k]
        fixed = self.fit_bytes(len(cache.positives), self.dim, int(np.count_nonzero(cache.positives)))
        if fixed >= self.max_cache_bytes:  # the positives alone pass it: no set of negatives fits
            return neg_ids
        per_row = self.fit_bytes(1, self.dim, self.store.nonzeros[neg_ids]) - self.fit_bytes(0, self.dim, 0)
        hardness = self._margins(self.store.rows(neg_ids), self.W[:, k], self.b[k])
        order = np.argsort(-hardness, kind="stable")
        # at least the hardest one: a fit needs negatives
        room = max(1, int(np.searchsorted(np.cumsum(per_row[order]), self.max_cache_bytes - fixed, side="right")))
        gone = np.ones(len(neg_ids), dtype=bool)
        gone[order[:room]] = False
        self._evict(cache, neg_ids, gone)
        self.evicted_for_memory += int(gone.sum())
        return neg_ids[~gone]

    @staticmethod
    def _margins(rows: Rows, w: np.ndarray, b: np.float32) -> np.ndarray:
        """float32 scores of ``rows``, read in 64 MB chunks: no copy of them all."""
        parts = [chunk @ w + b for chunk in rows.chunks()]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _retrain(self, classes: list[int], image_index: int) -> None:
        ids = {k: self._within_fit_budget(k, self.caches[k].negative_ids()) for k in classes}

        def fit_one(k: int) -> SvmFit:
            # Only the fit here, no BLAS: these threads fork liblinear's fit processes, and a fork while another
            # thread is inside a BLAS call can deadlock (it did, in pool5 SVMs on VOC).
            return self.fit(k, self.caches[k].positives, self.store.rows(ids[k]))

        parallel = self.parallel_fits(classes)
        if parallel > 1:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                fits = list(pool.map(fit_one, classes))
        else:
            fits = [fit_one(k) for k in classes]
        for k, fitted in zip(classes, fits):
            # One class at a time, after every fork (BLAS), each reading the rows in chunks.
            X_neg = self.store.rows(ids[k])
            objective = self.objective(fitted.w, fitted.b, self.caches[k].positives, X_neg)
            # evict "easy" negatives: z < evict_thresh
            keep = self._margins(X_neg, np.asarray(fitted.w, dtype=np.float32), np.float32(fitted.b)) \
                >= self.schedule.evict_thresh
            del X_neg
            cache = self.caches[k]
            self.W[:, k] = fitted.w
            self.b[k] = fitted.b
            self.trained[k] = True
            cache.num_added = 0
            cache.ids = [ids[k][keep]]
            self.store.release(ids[k][~keep])
            cache.key_set = set(map(tuple, self.store.keys[ids[k][keep]].tolist()))
            cache.retrains.append(Retrain(image_index, len(keep), int((~keep).sum()), objective, fitted.n_iter,
                                          fitted.converged))
        dead = int((self.store.holders == 0).sum())
        if dead and dead >= COMPACT_DEAD_FRACTION * len(self.store):
            self._compact()


def mine_hard_negatives(stream: Iterable[ImageNegatives], positives: Sequence[np.ndarray], fit: FitFn,
                        schedule: MiningSchedule = MiningSchedule(), objective: Callable[..., dict] = svm_objective,
                        workers: int = 1, max_cache_bytes: float = math.inf,
                        fit_bytes: Callable[..., int] = fit_memory_bytes) -> HardNegativeMiner:
    """Run the schedule over ``stream`` (one pass; the last image is detected by look-ahead)."""
    miner = HardNegativeMiner(positives, fit, schedule, objective, workers, max_cache_bytes, fit_bytes)
    iterator = iter(stream)
    current = next(iterator, None)
    while current is not None:
        upcoming = next(iterator, None)
        miner.add_image(current, is_last=upcoming is None)
        current = upcoming
    return miner


