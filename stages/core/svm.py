"""The per-class linear SVM of ``spp train-svm``: liblinear's solver through scikit-learn (or the same solver on the
rows in place, ``core.dense_svm``), its objective, and ``svm_fitter``, which fits several classes at once and still
gives the same SVMs on every run.

Processes, not threads, for liblinear: scikit-learn's liblinear draws its coordinate order from one process-wide
Mersenne Twister (``sklearn/svm/src/newrand``), re-seeded at the start of every fit. Two fits running in threads of
one process share it, so each one's draws depend on the other's timing and the SVMs change from run to run. One fit
at a time per process keeps every fit a function of its inputs and seed; a forked child per fit keeps them parallel
without copying the (up to GBs of) training features. The dense solver has a generator per fit and releases the
GIL: its fits run in threads.

``Rows`` names training rows where they lie (train-svm's negative store) so that no fit needs a gathered copy.

``SvmModel`` is what ``svm.npz`` holds: ``save_svm_model`` writes it, ``load_svm_model`` reads it back, and
``SvmModel.scores`` applies it (train-svm writes the file, detect reads and applies it).
"""
from __future__ import annotations

import gc
import io
import multiprocessing
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch

from .artifacts import atomic_write_bytes
from .errors import SppError
from .registry import command_for_path


@dataclass(frozen=True)
class SvmSolver:
    """liblinear's ``-s 3 -c C -w1 pos_weight -B bias_multiplier`` [S:spp_train.m update_model]; ``method``:
    "liblinear" (scikit-learn's) or "dense" (``core.dense_svm``, the same solver on float32 rows in place)."""

    C: float = 1e-3
    pos_weight: float = 2.0
    bias_multiplier: float = 10.0
    tol: float = 1e-4
    max_iter: int = 20000
    seed: int = 0
    method: str = "liblinear"

    @classmethod
    def from_config(cls, svm_cfg, seed: int = 0) -> "SvmSolver":
        return cls(C=svm_cfg.C, pos_weight=svm_cfg.pos_weight, bias_multiplier=svm_cfg.bias_multiplier,
                   tol=svm_cfg.tol, max_iter=svm_cfg.max_iter, seed=seed, method=svm_cfg.solver)


CHUNK_BYTES = 64 << 20  # rows read at a time by a pass over a training set (no copy of it all)


@dataclass(frozen=True, eq=False)
class Rows:
    """float32 rows named where they lie, not copied: row i is ``blocks[block[i]][row[i]]``."""

    blocks: Sequence[np.ndarray]  # float32 [m, D], C-contiguous
    block: np.ndarray  # int64 [n]
    row: np.ndarray  # int64 [n]

    @classmethod
    def of(cls, array: np.ndarray) -> "Rows":
        array = np.ascontiguousarray(array, dtype=np.float32)
        return cls((array,), np.zeros(len(array), np.int64), np.arange(len(array), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.block)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """A copy of them all (``np.asarray(rows)``), for code that wants a matrix."""
        if copy is False:
            raise ValueError("Rows are gathered from their blocks: a matrix of them is always a copy")
        out = self.gather()
        return out if dtype is None else out.astype(dtype)

    @property
    def dim(self) -> int:
        return int(self.blocks[0].shape[1])

    def gather(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` in order, written into ``out`` (any float type; float32 [hi - lo, D] made if None)."""
        block, row = self.block[lo:hi], self.row[lo:hi]
        if out is None:
            out = np.empty((len(block), self.dim), np.float32)
        order = np.argsort(block, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(block[order])) + 1):
            if len(part):
                out[part] = self.blocks[block[part[0]]][row[part]]
        return out

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """float32 copies of consecutive rows, about ``max_bytes`` each: a pass over them without a copy of all."""
        step = max(1, max_bytes // (4 * self.dim))
        for lo in range(0, len(self), step):
            yield self.gather(lo, lo + step)


Matrix = Union[np.ndarray, Rows]


def _as_rows(X: Matrix) -> Rows:
    return X if isinstance(X, Rows) else Rows.of(X)


@dataclass(frozen=True)
class SvmFit:
    w: np.ndarray  # float32 [D]
    b: float
    n_iter: int
    converged: bool


def svm_objective(w: np.ndarray, b: float, X_pos: Matrix, X_neg: Matrix, C: float = 1e-3,
                  pos_weight: float = 2.0, bias_multiplier: float = 10.0) -> dict[str, float]:
    """The primal objective liblinear minimises (SPEC §5), in float64, split as the released code prints it:
    ``reg = 0.5 |w|^2 + 0.5 (b/B)^2``, ``pos = C * pos_weight * sum max(0, 1 - z)``, ``neg = C * sum max(0, 1 + z)``.
    The rows are read in chunks: no float64 copy of them all."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)

    def margins(X: Matrix) -> np.ndarray:
        if isinstance(X, Rows):
            chunks = X.chunks()
        else:  # taken as it is (float64 stays exact), in slices of about CHUNK_BYTES
            X = np.asarray(X).reshape(-1, len(w))
            step = max(1, CHUNK_BYTES // (X.itemsize * len(w)))
            chunks = (X[lo:lo + step] for lo in range(0, len(X), step))
        parts = [np.asarray(chunk, dtype=np.float64) @ w + b for chunk in chunks]
        return np.concatenate(parts) if parts else np.zeros(0)

    z_pos, z_neg = margins(X_pos), margins(X_neg)
    reg = 0.5 * float(w @ w) + 0.5 * (float(b) / bias_multiplier) ** 2
    pos = C * pos_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
    neg = C * float(np.maximum(0.0, 1.0 + z_neg).sum())
    return {"total": reg + pos + neg, "reg": reg, "pos": pos, "neg": neg}


def fit_linear_svm(X_pos: Matrix, X_neg: Matrix, solver: SvmSolver = SvmSolver()) -> SvmFit:
    """Fit one class: positives labelled +1, negatives -1, with liblinear's dual coordinate descent (``solver.method``:
    scikit-learn's liblinear, or ``core.dense_svm`` on the rows in place).

    sklearn's ``intercept_scaling`` is liblinear's ``-B``: a constant feature B whose weight w_B is regularised
    like the others, and ``intercept_ = B * w_B``, the released code's ``b = w(end) * bias_mult``.
    """
    if len(X_pos) == 0 or len(X_neg) == 0:
        raise ValueError(f"an SVM needs positives and negatives (got {len(X_pos)} and {len(X_neg)})")
    if solver.method == "dense":
        return _fit_dense(_as_rows(X_pos), _as_rows(X_neg), solver)
    if solver.method != "liblinear":
        raise ValueError(f"unknown SVM solver {solver.method!r} (known: liblinear, dense)")
    # Written straight into float64 (what LinearSVC takes): a float32 copy first would be held as well.
    X = np.empty((len(X_pos) + len(X_neg), X_pos.dim if isinstance(X_pos, Rows) else np.shape(X_pos)[1]),
                 dtype=np.float64)
    for part, source in ((X[:len(X_pos)], X_pos), (X[len(X_pos):], X_neg)):
        if isinstance(source, Rows):
            source.gather(out=part)
        else:
            part[:] = source
    y = np.concatenate([np.ones(len(X_pos)), -np.ones(len(X_neg))])
    LinearSVC, ConvergenceWarning = _liblinear()
    model = LinearSVC(penalty="l2", loss="hinge", dual=True, C=solver.C,
                      class_weight={1: solver.pos_weight, -1: 1.0}, fit_intercept=True,
                      intercept_scaling=solver.bias_multiplier, tol=solver.tol, max_iter=solver.max_iter,
                      random_state=solver.seed)
    with warnings.catch_warnings():
        # Convergence is returned (n_iter < max_iter) and reported per class, not warned per fit.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    n_iter = int(np.max(model.n_iter_))
    # classes_ is sorted (-1, 1): coef_ scores the +1 class.
    return SvmFit(model.coef_[0].astype(np.float32), float(model.intercept_[0]), n_iter, n_iter < solver.max_iter)


def _fit_dense(pos: Rows, neg: Rows, solver: SvmSolver) -> SvmFit:
    from .dense_svm import fit_dense_dual

    blocks = (*pos.blocks, *neg.blocks)
    block = np.concatenate([pos.block, neg.block + len(pos.blocks)])
    labels = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    w, b, passes = fit_dense_dual(blocks, block, np.concatenate([pos.row, neg.row]), labels, C=solver.C,
                                  pos_weight=solver.pos_weight, bias_multiplier=solver.bias_multiplier,
                                  tol=solver.tol, max_iter=solver.max_iter, seed=solver.seed)
    return SvmFit(w.astype(np.float32), b, passes, passes < solver.max_iter)


def _liblinear() -> tuple[type, type]:
    """scikit-learn's LinearSVC and ConvergenceWarning, imported when a fit needs them: the import takes 1-2 s,
    which detection (it only applies ``SvmModel``) should not pay."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    return LinearSVC, ConvergenceWarning


def fit_memory_bytes(rows, dim: int, nonzeros, method: str = "liblinear"):
    """Bytes one ``fit_linear_svm`` allocates for a ``rows`` x ``dim`` training set with ``nonzeros`` nonzero values
    (elementwise for arrays). liblinear: its float64 copy (8 bytes a value) and liblinear's sparse copy of it
    (sklearn's ``dense_to_sparse``: a 16-byte (index, value) node per nonzero, plus a bias node and an end node per
    row); both live until the fit returns. dense: no copy, its own 7 float64-sized values per row and the weights."""
    if method == "dense":
        return 56 * rows + 8 * (dim + 1) + 0 * nonzeros  # "+ 0 * nonzeros": elementwise when nonzeros is an array
    return 8 * rows * dim + 16 * (nonzeros + 2 * rows)


def _fit_and_send(X_pos: np.ndarray, X_neg: np.ndarray, solver: SvmSolver, send) -> None:
    """Body of a forked fitting process: fit, send ``("ok", SvmFit)`` or ``("error", exception)``, exit."""
    try:
        send.send(("ok", fit_linear_svm(X_pos, X_neg, solver)))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
        send.send(("error", exc))
    finally:
        send.close()


_FORK_LOCK = threading.Lock()  # gc.freeze/unfreeze are process-wide: one fork at a time


def fit_in_fork(X_pos: np.ndarray, X_neg: np.ndarray, solver: SvmSolver) -> SvmFit:
    """``fit_linear_svm`` in a forked child: it sees the arrays through fork's copy-on-write (nothing is pickled
    or copied but the small result), and its liblinear generator is its own."""
    _liblinear()  # imported here, once: each forked child inherits it instead of importing it again
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_fit_and_send, args=(X_pos, X_neg, solver, send), daemon=True)
    with warnings.catch_warnings(), _FORK_LOCK:
        # Python >= 3.12 warns about fork in a threaded process; the child runs only numpy and liblinear, which
        # take no lock another thread could hold (no torch, no OpenMP).
        warnings.simplefilter("ignore", DeprecationWarning)
        # Frozen objects are never collected: the child must not finalize what it inherited (an open HDF5 file
        # would be closed, and flushed, from the child; h5py's lock may be held by another parent thread).
        gc.freeze()
        try:
            child.start()
        finally:
            gc.unfreeze()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        child.join()
        hint = (" (killed: out of memory? lower svm.max_cache_gb, which bounds the negative cache and the fits "
                "running at once)" if child.exitcode == -9 else "")
        raise SppError(f"the SVM fitting process died with exit code {child.exitcode}{hint}") from None
    finally:
        receive.close()
    child.join()
    if status == "error":
        raise payload
    return payload


@contextmanager
def svm_fitter(solver: SvmSolver, workers: int = 1) -> Iterator[Callable[[np.ndarray, np.ndarray], SvmFit]]:
    """``fit(X_pos, X_neg) -> SvmFit`` for ``solver``, safe to call from several threads at once. liblinear: with
    ``workers`` > 1 each call forks a process of its own (the calling thread only waits; ``fit_in_fork``), else it
    runs in the calling thread; where fork does not exist (Windows) the fits run one at a time in the caller,
    whatever ``workers`` says. dense: in the calling thread, always. The results are the same either way, to the
    bit."""
    if solver.method == "dense":  # a generator per fit, the GIL released: any thread, any number at once
        from .dense_svm import compile_kernel

        compile_kernel()  # once, before the threads (or loaded from numba's disk cache)
        yield lambda X_pos, X_neg: fit_linear_svm(X_pos, X_neg, solver)
        return
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        lock = threading.Lock()  # one liblinear fit at a time in this process (see the module doc)

        def fit_here(X_pos: np.ndarray, X_neg: np.ndarray) -> SvmFit:
            with lock:
                return fit_linear_svm(X_pos, X_neg, solver)

        yield fit_here
        return
    yield lambda X_pos, X_neg: fit_in_fork(X_pos, X_neg, solver)


# ------------------------------------------------------------------------------------------------ the model file
@dataclass(frozen=True)
class SvmModel:
    """What ``svm.npz`` holds; ``scores`` applies the feature scaling and every class's SVM."""

    W: np.ndarray  # float32 [D, K]
    b: np.ndarray  # float32 [K]
    feature: str
    feature_scale: float
    mean_norm: float
    classes: tuple[str, ...]
    scales: tuple[int, ...]
    pyramid: tuple[int, ...]
    trained: np.ndarray  # bool [K]: False for a class without training positives (its b is -inf)
    # W and b as float32 tensors per torch device, made on first use (detect scores every image on its device).
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[N, K] scores of features [N, D]: numpy in, numpy out; a tensor in, a tensor on its device out."""
        if isinstance(features, torch.Tensor):
            if features.device not in self._on_device:
                self._on_device[features.device] = (
                    torch.as_tensor(self.W, dtype=torch.float32, device=features.device),
                    torch.as_tensor(self.b, dtype=torch.float32, device=features.device))
            W, b = self._on_device[features.device]
            return (features * self.feature_scale) @ W + b
        return (np.asarray(features, dtype=np.float32) * np.float32(self.feature_scale)) @ self.W + self.b


def save_svm_model(path: Path, model: SvmModel) -> None:
    """Write ``model`` to ``path`` (``svm.npz``) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, W=model.W.astype(np.float32), b=model.b.astype(np.float32), feature=np.array(model.feature),
             feature_scale=np.float64(model.feature_scale), mean_norm=np.float64(model.mean_norm),
             classes=np.array(model.classes, dtype=str), scales=np.array(model.scales, dtype=np.int64),
             pyramid=np.array(model.pyramid, dtype=np.int64), trained=model.trained.astype(bool))
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_svm_model(path: Path) -> SvmModel:
    """The model ``save_svm_model`` wrote (a one-line SppError naming the file and the command otherwise)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return SvmModel(W=data["W"], b=data["b"], feature=str(data["feature"]),
                            feature_scale=float(data["feature_scale"]), mean_norm=float(data["mean_norm"]),
                            classes=tuple(str(c) for c in data["classes"]),
                            scales=tuple(int(s) for s in data["scales"]),
                            pyramid=tuple(int(n) for n in data["pyramid"]), trained=data["trained"].astype(bool))
    except (OSError, KeyError, ValueError) as exc:
        raise SppError(f"unreadable SVM file ({type(exc).__name__}: {exc}); rerun `{command_for_path(Path(path))}`",
                       path) from None
