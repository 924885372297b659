"""Peak memory of `spp train-svm`'s hard-negative mining: the per-class caches it had (every class kept its own
float32 copy of each negative it cached) against the shared store it has now (each window once; classes hold ids).

No dataset: synthetic post-ReLU window features of the given dimension, in which a window's hardness is mostly
shared between classes (as on real images: a cluttered window scores high for many classes). Each layout runs in
a process of its own, one after the other, on the same stream (seeded per image), and reports its peak RSS
(``ru_maxrss``), its peak before mining (imports: torch and the rest; "mining" is the difference), the peak size
of the cached features after each image ("cache"), the cached rows at the end (per class, summed) and the distinct
windows among them, and a digest of the SVMs, which must be the same for both layouts unless the bound was reached.

The fit is a stand-in for liblinear (minutes per class at 16,000-d): it makes the copies a real fit makes
(``core.svm.fit_memory_bytes``: the float64 training set and a buffer the size of liblinear's nodes) and returns a
centroid classifier whose bias puts ~3% of its training negatives above the mining threshold, so that images add
hard negatives and retrains evict easy ones as on real data. ``--fit liblinear`` runs the real solver (small dims).

    .venv/bin/python bench/svm_memory.py --dim 16000 --classes 20 --images 200 --windows 2000 [--max-cache-gb 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from stages import train_svm as T  # noqa: E402
from stages.core.svm import SvmFit, SvmSolver, fit_linear_svm, fit_memory_bytes  # noqa: E402

POSITIVES = 30  # per class
HARD_QUANTILE = 0.8  # stand-in fit: this quantile of its negatives' scores lands on the margin (-1)


def rss_gib(who=resource.RUSAGE_SELF) -> float:
    """Peak RSS in GiB of this process (or of its largest finished child)."""
    return resource.getrusage(who).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30


def add_problem_arguments(parser: argparse.ArgumentParser, images: int) -> None:
    """The synthetic stream's options (``problem``), ``images`` images by default."""
    parser.add_argument("--dim", type=int, default=16000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--windows", type=int, default=2000, help="windows per image")
    parser.add_argument("--retrain-every", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--own", type=float, default=0.5, help="weight of the class-specific part of hardness")


def figures_in_child(script: str, *flags: str) -> dict:
    """Run ``script`` with this command line plus ``flags`` in a process of its own (so its peak RSS is its own
    alone) and return the JSON of its last output line; exit with its error if it fails."""
    done = subprocess.run([sys.executable, script, *sys.argv[1:], *flags], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(flags)}: exit code {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def problem(args):
    """(stream, positives): ``args.images`` images of ``args.windows`` windows; features relu(0.5 n + h u + c), with
    a per-window hardness h along a direction u shared by all classes."""
    rng = np.random.default_rng(args.seed)
    shared = np.abs(rng.normal(0, 1, args.dim)).astype(np.float32)
    shared /= np.linalg.norm(shared) / np.sqrt(args.dim) * 2  # entries ~0.5
    own = rng.normal(0, 1, (args.classes, args.dim)).astype(np.float32)
    positives = [np.maximum(0.5 * rng.normal(0, 1, (POSITIVES, args.dim)) + shared + 0.5 * own[k], 0).astype(np.float32)
                 for k in range(args.classes)]

    def stream():
        for i in range(args.images):
            r = np.random.default_rng([args.seed, i])
            hardness = r.normal(-0.5, 0.6, (args.windows, 1)).astype(np.float32)
            feats = 0.5 * r.standard_normal((args.windows, args.dim), dtype=np.float32) + hardness * shared
            # ... and some look like one class: hard for that class only.
            for k, rows in enumerate(np.array_split(r.permutation(args.windows), args.classes)):
                feats[rows] += r.normal(0, args.own, (len(rows), 1)).astype(np.float32) * own[k]
            np.maximum(feats, 0, out=feats)
            # A window is a negative of every class but the (few) classes it overlaps.
            candidates = r.random((args.windows, args.classes)) > 0.05
            yield T.ImageNegatives(i, feats, np.arange(args.windows), candidates)

    return stream(), positives


def standin_fit(k: int, X_pos: np.ndarray, X_neg: np.ndarray) -> SvmFit:
    """Memory as a liblinear fit (its float64 copy, its nodes), result a centroid classifier."""
    X = np.empty((len(X_pos) + len(X_neg), X_pos.shape[1]), np.float64)
    X[:len(X_pos)], X[len(X_pos):] = X_pos, X_neg
    nodes = np.ones(fit_memory_bytes(len(X), X.shape[1], int(np.count_nonzero(X))) - X.nbytes, np.uint8)
    w = X[:len(X_pos)].mean(axis=0) - X[len(X_pos):].mean(axis=0)
    z = X[len(X_pos):] @ w
    w /= max(z.std(), 1e-12) * 2  # negatives' scores spread ~0.5
    b = -1.0 - float(np.quantile(X[len(X_pos):] @ w, HARD_QUANTILE))
    del X, nodes
    return SvmFit(w.astype(np.float32), b, 1, True)


def no_objective(w, b, X_pos, X_neg) -> dict:
    return {"total": 0.0}


def run_layout(args) -> dict:
    """Mine in this process with one layout; the figures as a dict."""
    from test_train_svm import PerClassMiner  # the per-class caches, kept as the tests' reference

    stream, positives = problem(args)
    fit = standin_fit if args.fit == "standin" else (lambda k, P, N: fit_linear_svm(P, N, SvmSolver(tol=0.01)))
    schedule = T.MiningSchedule(retrain_limit=args.retrain_every)
    before = rss_gib()
    started = time.perf_counter()
    if args.layout == "per-class":
        miner = PerClassMiner(positives, fit, schedule, objective=no_objective)
    else:
        miner = T.HardNegativeMiner(positives, fit, schedule, objective=no_objective,
                                    max_cache_bytes=args.max_cache_gb * 2 ** 30)

    def cache_bytes() -> int:  # the cached negatives' features: what the layouts differ in
        if args.layout == "per-class":
            return sum(x.nbytes for chunks in miner.features for x in chunks)
        return miner.store.nbytes

    cache_peak = 0
    images = iter(stream)
    current = next(images, None)
    while current is not None:
        upcoming = next(images, None)
        miner.add_image(current, is_last=upcoming is None)
        cache_peak = max(cache_peak, cache_bytes())  # after the image's retrains (its evictions done)
        current = upcoming
    if args.layout == "per-class":
        rows = sum(len(miner.cache(k)[0]) for k in range(args.classes))
        distinct = len({key for k in range(args.classes) for key in map(tuple, miner.cache(k)[1].tolist())})
        retrains = sum(len(log) for log in miner.retrains)
    else:
        rows = sum(c.num_negatives for c in miner.caches)
        distinct = int((miner.store.holders > 0).sum())
        retrains = sum(len(c.retrains) for c in miner.caches)
    digest = hashlib.sha256(miner.W.tobytes() + miner.b.tobytes()).hexdigest()[:16]
    return {"layout": args.layout, "peak_gib": round(rss_gib(), 3), "before_mining_gib": round(before, 3),
            "children_peak_gib": round(rss_gib(resource.RUSAGE_CHILDREN), 3),
            "cache_peak_gib": round(cache_peak / 2 ** 30, 3),
            "seconds": round(time.perf_counter() - started, 1), "cached_rows": rows, "distinct_windows": distinct,
            "retrains": retrains, "evicted_for_memory": getattr(miner, "evicted_for_memory", 0), "svms": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(parser, images=200)
    parser.add_argument("--fit", choices=("standin", "liblinear"), default="standin")
    parser.add_argument("--max-cache-gb", type=float, default=float("inf"), help="the shared store's bound (GiB)")
    parser.add_argument("--layout", choices=("per-class", "shared"), help="run one layout here (internal)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.layout:
        print(json.dumps(run_layout(args)))
        return
    # one after the other: each process's peak is its own
    results = [figures_in_child(__file__, "--layout", layout) for layout in ("per-class", "shared")]
    print(f"dim {args.dim}, {args.classes} classes, {args.images} images x {args.windows} windows, fit {args.fit}")
    print(f"{'layout':>10} {'peak GiB':>9} {'mining GiB':>11} {'cache GiB':>10} {'cached rows':>12} {'distinct':>9} "
          f"{'retrains':>9} {'evicted':>8} {'s':>7}  svms")
    for r in results:
        print(f"{r['layout']:>10} {r['peak_gib']:>9.2f} {r['peak_gib'] - r['before_mining_gib']:>11.2f} "
              f"{r['cache_peak_gib']:>10.2f} {r['cached_rows']:>12} {r['distinct_windows']:>9} {r['retrains']:>9} "
              f"{r['evicted_for_memory']:>8} {r['seconds']:>7.1f}  {r['svms']}")
    old, new = results
    mining = [r["peak_gib"] - r["before_mining_gib"] for r in results]
    cache = [r["cache_peak_gib"] for r in results]
    print(f"peak RSS ratio per-class / shared: {old['peak_gib'] / new['peak_gib']:.2f} (mining only: "
          f"{mining[0] / max(mining[1], 1e-9):.2f}; cache: {cache[0] / max(cache[1], 1e-9):.2f}); "
          f"same SVMs: {'yes' if old['svms'] == new['svms'] else 'NO (expected only when the bound was reached)'}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("layout", "json")},
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
