"""`spp train-svm`'s hard-negative mining with each SVM solver, side by side: scikit-learn's liblinear (each fit
copies its training set into float64 and liblinear's 16-byte nodes) against the same solver on the cached float32
rows in place (``svm.solver = "dense"``, stages/core/dense_svm.py).

No dataset: bench/svm_memory.py's synthetic window features (post-ReLU, hardness shared between classes). Each
solver mines the same stream in a process of its own, one after the other, with the stage's own pieces (the miner,
``svm_fitter`` with ``--workers`` fits at once, the memory bound ``--max-cache-gb``), and reports its peak RSS (the
process and its largest forked fit), wall seconds, the retrains, the negatives evicted to keep a fit within the
bound, and each class's final objective; then how far apart the two solvers' SVMs are.

    .venv/bin/python bench/svm_solvers.py --dim 16000 --classes 20 --images 40 --windows 2000 --max-cache-gb 4

``--one-fit N``: instead, one fit of 130 positives and N negatives (``--density``: the fraction of nonzero values),
each solver in turn in this process: seconds, passes and the objective.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from stages import train_svm as T  # noqa: E402
from stages.core.svm import SvmSolver, fit_memory_bytes, svm_fitter, svm_objective  # noqa: E402
from svm_memory import add_problem_arguments, figures_in_child, problem, rss_gib  # noqa: E402

SOLVERS = ("liblinear", "dense")


def run_solver(args) -> dict:
    """Mine with ``args.solver`` in this process; the figures as a dict, the SVMs to ``args.out``."""
    stream, positives = problem(args)
    solver = SvmSolver(tol=args.tol, method=args.solver, seed=args.seed)

    def objective(w, b, X_pos, X_neg):
        return svm_objective(w, b, X_pos, X_neg, solver.C, solver.pos_weight, solver.bias_multiplier)

    before, children_before = rss_gib(), rss_gib(resource.RUSAGE_CHILDREN)  # importing torch forks one (~0.5 GiB)
    started = time.perf_counter()
    with svm_fitter(solver, args.workers) as fit:
        miner = T.mine_hard_negatives(
            stream, positives, lambda k, X_pos, X_neg: fit(X_pos, X_neg), T.MiningSchedule(retrain_limit=args.retrain_every),
            objective=objective, workers=args.workers, max_cache_bytes=args.max_cache_gb * 2 ** 30,
            fit_bytes=lambda rows, dim, nonzeros: fit_memory_bytes(rows, dim, nonzeros, solver.method))
    seconds = time.perf_counter() - started
    np.savez(args.out, W=miner.W, b=miner.b)
    last = [c.retrains[-1] for c in miner.caches if c.retrains]
    return {"solver": args.solver, "peak_gib": round(rss_gib(), 3), "before_mining_gib": round(before, 3),
            # the largest forked fit; 0 when no fit forked (or none outgrew the import's child)
            "fit_children_peak_gib": round(rss_gib(resource.RUSAGE_CHILDREN), 3)
            if rss_gib(resource.RUSAGE_CHILDREN) > children_before else 0.0, "seconds": round(seconds, 1),
            "retrains": sum(len(c.retrains) for c in miner.caches), "evicted_for_memory": miner.evicted_for_memory,
            "negatives_in_last_fits": int(sum(r.negatives for r in last)),
            "objective_mean": float(np.mean([r.objective["total"] for r in last])),
            "converged": all(r.converged for c in miner.caches for r in c.retrains)}


def one_fit(args) -> None:
    from stages.core.svm import fit_linear_svm

    rng = np.random.default_rng(args.seed)

    def rows(count: int, shift: float) -> np.ndarray:
        values = np.abs(rng.normal(size=(count, args.dim))).astype(np.float32) + np.float32(shift)
        return values * (rng.random((count, args.dim), dtype=np.float32) < args.density)

    X_pos, X_neg = rows(130, 0.3), rows(args.one_fit, 0.0)
    scale = np.float32(20 / np.linalg.norm(X_neg, axis=1).mean())  # train-svm's feature scaling
    X_pos *= scale
    X_neg *= scale
    print(f"one fit: 130 positives, {args.one_fit} negatives, dim {args.dim}, density {args.density}, tol {args.tol}")
    for method in SOLVERS:
        solver = SvmSolver(tol=args.tol, method=method, seed=args.seed)
        fit_linear_svm(X_pos[:2], X_neg[:2], solver)  # imports and compilation out of the timing
        started = time.perf_counter()
        fitted = fit_linear_svm(X_pos, X_neg, solver)
        seconds = time.perf_counter() - started
        total = svm_objective(fitted.w, fitted.b, X_pos, X_neg)["total"]
        print(f"{method:>10}: {seconds:7.2f} s, {fitted.n_iter} passes, objective {total:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(parser, images=40)  # bench/svm_memory.py's synthetic stream
    parser.add_argument("--tol", type=float, default=0.1, help="svm.tol (the CPU preset's)")
    parser.add_argument("--workers", type=int, default=2, help="svm.workers: fits at once")
    parser.add_argument("--max-cache-gb", type=float, default=8.0, help="svm.max_cache_gb")
    parser.add_argument("--one-fit", type=int, metavar="N", help="time one fit of N negatives instead")
    parser.add_argument("--density", type=float, default=1.0, help="--one-fit: fraction of nonzero values")
    parser.add_argument("--solver", choices=SOLVERS, help="run one solver here (internal)")
    parser.add_argument("--out", type=Path, help="where the one solver writes its SVMs (internal)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.one_fit:
        one_fit(args)
        return
    if args.solver:
        print(json.dumps(run_solver(args)))
        return
    results, svms = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for solver in SOLVERS:  # one after the other: each process's peak is its own
            out = Path(scratch) / f"{solver}.npz"
            results.append(figures_in_child(__file__, "--solver", solver, "--out", str(out)))
            with np.load(out) as data:
                svms[solver] = (data["W"], data["b"])
    (W1, _), (W2, _) = svms["liblinear"], svms["dense"]
    cosine = (W1 * W2).sum(0) / np.maximum(np.linalg.norm(W1, axis=0) * np.linalg.norm(W2, axis=0), 1e-30)
    print(f"dim {args.dim}, {args.classes} classes, {args.images} images x {args.windows} windows, tol {args.tol}, "
          f"{args.workers} fits at once, svm.max_cache_gb {args.max_cache_gb}")
    print(f"{'solver':>10} {'peak GiB':>9} {'mining GiB':>11} {'fit child GiB':>14} {'s':>7} {'retrains':>9} "
          f"{'evicted':>8} {'last fits neg':>14} {'objective':>10}  converged")
    for r in results:
        print(f"{r['solver']:>10} {r['peak_gib']:>9.2f} {r['peak_gib'] - r['before_mining_gib']:>11.2f} "
              f"{r['fit_children_peak_gib']:>14.2f} {r['seconds']:>7.1f} {r['retrains']:>9} "
              f"{r['evicted_for_memory']:>8} {r['negatives_in_last_fits']:>14} {r['objective_mean']:>10.4f}  "
              f"{'yes' if r['converged'] else 'NO'}")
    slow, fast = results
    peak = [max(r["peak_gib"], r["fit_children_peak_gib"]) for r in results]
    print(f"liblinear / dense: time {slow['seconds'] / max(fast['seconds'], 1e-9):.2f}x, peak "
          f"{peak[0] / max(peak[1], 1e-9):.2f}x; SVM cosine per class: min {cosine.min():.4f}, "
          f"median {np.median(cosine):.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()
                                                  if k not in ("solver", "out", "json")},
                                         "results": results, "svm_cosine": cosine.round(6).tolist()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
