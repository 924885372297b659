"""liblinear's ``-s 3`` solver (L2-regularised hinge loss, dual coordinate descent with shrinking; Hsieh et al.
2008, liblinear's ``solve_l2r_l1l2_svc``) on float32 rows read where they lie: ``svm.solver = "dense"``.

Why: liblinear through scikit-learn copies a training set into float64 and then into its own 16-byte (index,
value) nodes, 6x the float32 rows of a dense 16,000-d pool5 set, and train-svm's memory bound then has to drop
negatives to make a fit fit. This solver reads the rows of the cache's blocks in place (a few bytes per row of its
own: the dual variables and the visiting order) and streams 4 bytes per value instead of 16, so it is also faster.
Same algorithm and stopping rule as liblinear, so the same optimum up to ``tol``; not the same bits, since its
visiting order comes from its own generator (seeded: the same inputs give the same SVM on every run).

numba compiles the loop (this module is imported only when a fit needs it); it releases the GIL, so fits run in
threads. Reproducible on one machine, bit for bit; not across CPUs with different vector widths (``_FAST``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np
from numba.typed import List

# Module-level functions, so that numba's disk cache finds them again in the next process. ``reassoc``: the sums
# are vectorised in an order that depends on the CPU's vector width, so a fit is reproducible on one machine (the
# same inputs and seed give the same bits), not across machines.
_FAST = {"reassoc", "nsz", "contract"}


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _dot(w, x):
    acc = 0.0
    for j in range(x.shape[0]):
        acc += w[j] * x[j]
    return acc


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _sumsq(x):
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j]) * x[j]
    return acc


@numba.njit(nogil=True, cache=True)
def _solve(blocks, block, row, y, upper, bias, eps, max_iter, seed, w):
    n = len(y)
    dim = w.shape[0] - 1  # the last weight is the bias feature's
    alpha = np.zeros(n)
    qd = np.empty(n)
    for i in range(n):
        qd[i] = _sumsq(blocks[block[i]][row[i]]) + bias * bias
    index = np.arange(n)
    active = n
    pg_max_old, pg_min_old = np.inf, -np.inf
    state = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)  # xorshift64
    if state == np.uint64(0):
        state = np.uint64(1)
    it = 0
    while it < max_iter:
        pg_max_new, pg_min_new = -np.inf, np.inf
        for s in range(active):  # shuffle the active set (liblinear: a swap with a random later one)
            state ^= state << np.uint64(13)
            state ^= state >> np.uint64(7)
            state ^= state << np.uint64(17)
            j = s + np.int64(state % np.uint64(active - s))
            index[s], index[j] = index[j], index[s]
        s = 0
        while s < active:
            i = index[s]
            x = blocks[block[i]][row[i]]
            g = y[i] * (_dot(w, x) + w[dim] * bias) - 1.0
            c = upper[i]
            pg = 0.0
            if alpha[i] == 0.0:
                if g > pg_max_old:  # shrink: at its bound and likely to stay there
                    active -= 1
                    index[s], index[active] = index[active], index[s]
                    continue
                if g < 0.0:
                    pg = g
            elif alpha[i] == c:
                if g < pg_min_old:
                    active -= 1
                    index[s], index[active] = index[active], index[s]
                    continue
                if g > 0.0:
                    pg = g
            else:
                pg = g
            pg_max_new = max(pg_max_new, pg)
            pg_min_new = min(pg_min_new, pg)
            if abs(pg) > 1e-12:
                old = alpha[i]
                alpha[i] = min(max(old - g / qd[i], 0.0), c)
                d = (alpha[i] - old) * y[i]
                for k in range(dim):
                    w[k] += d * x[k]
                w[dim] += d * bias
            s += 1
        it += 1
        if pg_max_new - pg_min_new <= eps:
            if active == n:
                break
            active = n  # converged on the active set: check every variable once more
            pg_max_old, pg_min_old = np.inf, -np.inf
            continue
        pg_max_old = np.inf if pg_max_new <= 0 else pg_max_new
        pg_min_old = -np.inf if pg_min_new >= 0 else pg_min_new
    return it


_COMPILED = False


def compile_kernel() -> None:
    """Compile (or load from numba's disk cache) the solver for the types fits use, on a 2-row problem: once per
    process, before fits run in threads (they would otherwise wait on numba's compiler lock)."""
    global _COMPILED
    if not _COMPILED:
        rows = np.array([[1.0], [-1.0]], np.float32)
        fit_dense_dual([rows], np.zeros(2, np.int64), np.arange(2), np.array([1.0, -1.0]), C=1.0, pos_weight=1.0,
                       bias_multiplier=1.0, tol=0.1, max_iter=10, seed=0)
        _COMPILED = True


def fit_dense_dual(blocks: Sequence[np.ndarray], block: np.ndarray, row: np.ndarray, labels: np.ndarray, *,
                   C: float, pos_weight: float, bias_multiplier: float, tol: float, max_iter: int, seed: int
                   ) -> tuple[np.ndarray, float, int]:
    """Fit ``-s 3 -c C -w1 pos_weight -B bias_multiplier`` on the rows ``blocks[block[i]][row[i]]`` (float32,
    C-contiguous [m, D] arrays, not copied), ``labels`` +1 / -1. Returns (w float64 [D], b, passes)."""
    if not blocks:
        raise ValueError("no rows to fit")
    dim = blocks[0].shape[1]
    typed = List()
    for array in blocks:
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != dim or not array.flags.c_contiguous:
            raise ValueError(f"rows must be C-contiguous float32 [m, {dim}] arrays, got {array.dtype} "
                             f"{array.shape}")
        typed.append(array)
    block, row = np.asarray(block, np.int64), np.asarray(row, np.int64)
    # numba does not check indices: a bad one would read outside the rows, silently
    lengths = np.array([len(array) for array in blocks], np.int64)
    if len(block) != len(row) or len(block) != len(labels) or (len(block) and (
            block.min() < 0 or block.max() >= len(blocks) or row.min() < 0 or (row >= lengths[block]).any())):
        raise ValueError("row indices out of range of their blocks")
    labels = np.asarray(labels, dtype=np.float64)
    upper = np.where(labels > 0, C * pos_weight, C)
    w = np.zeros(dim + 1)
    passes = _solve(typed, block, row, labels, upper, float(bias_multiplier), float(tol), int(max_iter),
                    int(seed) & ((1 << 63) - 1), w)
    if not math.isfinite(float(w @ w)):
        raise FloatingPointError("the dense SVM solver diverged (non-finite weights)")
    return w[:dim], float(w[dim] * bias_multiplier), int(passes)
