"""``spp train-svm``: the objective, the solver settings against a direct minimisation, negative pruning (dedup and
overlap70) on hand cases, the hard-negative mining schedule on a hand-checkable stream, the shared negative store
against the per-class caches it replaced (same SVMs to the bit) and its memory bound, and the stage end to end."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages import train_svm as T
from stages.core.svm import (SvmFit, SvmModel, SvmSolver, fit_linear_svm, fit_memory_bytes, load_svm_model,
                              save_svm_model, svm_fitter, svm_objective)


# -- objective and solver ------------------------------------------------------------------------------------------
def test_objective_by_hand():
    w, b = np.array([1.0, 0.0]), 0.5
    X_pos = np.array([[0.2, 0.0], [3.0, 1.0]])  # z = 0.7 (hinge 0.3), 3.5 (0)
    X_neg = np.array([[-2.0, 0.0], [0.5, 1.0]])  # z = -1.5 (0), 1.0 (hinge 2.0)
    terms = svm_objective(w, b, X_pos, X_neg, C=1e-3, pos_weight=2.0, bias_multiplier=10.0)
    assert terms["reg"] == pytest.approx(0.5 + 0.5 * 0.05 ** 2)
    assert terms["pos"] == pytest.approx(1e-3 * 2 * 0.3)
    assert terms["neg"] == pytest.approx(1e-3 * 2.0)
    assert terms["total"] == pytest.approx(0.50125 + 0.0006 + 0.002)


def _toy_problem(seed=0, dim=4, n_pos=6, n_neg=14):
    rng = np.random.default_rng(seed)
    X_pos, X_neg = rng.normal(0.5, 1, (n_pos, dim)), rng.normal(-0.5, 1, (n_neg, dim))
    scale = 20 / np.linalg.norm(np.vstack([X_pos, X_neg]), axis=1).mean()  # mean norm 20, as the stage feeds it
    return X_pos * scale, X_neg * scale


def _direct_minimum(X_pos, X_neg, C=1e-3, pos_weight=2.0, bias_multiplier=10.0):
    """The SPEC §5 primal as a QP in (w, b, slack), solved by SLSQP: independent of liblinear."""
    from scipy.optimize import minimize

    X = np.vstack([X_pos, X_neg])
    y = np.r_[np.ones(len(X_pos)), -np.ones(len(X_neg))]
    cost = C * np.r_[np.full(len(X_pos), pos_weight), np.ones(len(X_neg))]
    d = X.shape[1]

    def objective(v):
        return 0.5 * v[:d] @ v[:d] + 0.5 * (v[d] / bias_multiplier) ** 2 + cost @ v[d + 1:]

    def gradient(v):
        return np.r_[v[:d], v[d] / bias_multiplier ** 2, cost]

    n = len(y)
    slack_jac = np.hstack([np.zeros((n, d + 1)), np.eye(n)])  # slack >= 0
    margin_jac = np.hstack([y[:, None] * X, y[:, None], np.eye(n)])  # slack - (1 - y (w.x + b)) >= 0
    constraints = [{"type": "ineq", "fun": lambda v: v[d + 1:], "jac": lambda v: slack_jac},
                   {"type": "ineq", "fun": lambda v: v[d + 1:] - (1 - y * (X @ v[:d] + v[d])), "jac": lambda v: margin_jac}]
    result = minimize(objective, np.zeros(d + 1 + n), jac=gradient, constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-14, "maxiter": 2000})
    assert result.success
    return result.x[:d], result.x[d], result.fun


@pytest.mark.parametrize("method", ["liblinear", "dense"])
def test_linearsvc_settings_minimise_the_liblinear_objective(method):
    X_pos, X_neg = _toy_problem()
    fit = fit_linear_svm(X_pos, X_neg, SvmSolver(method=method))
    w_ref, b_ref, minimum = _direct_minimum(X_pos, X_neg)
    ours = svm_objective(fit.w, fit.b, X_pos, X_neg)
    assert fit.converged
    assert np.linalg.norm(w_ref) > 0.05 and ours["pos"] > 0 and ours["neg"] > 0  # a non-trivial optimum
    assert ours["total"] == pytest.approx(minimum, rel=1e-5)
    np.testing.assert_allclose(fit.w, w_ref, atol=2e-4)
    assert fit.b == pytest.approx(b_ref, abs=2e-3)
    # The solution is the optimum of *this* objective: without the 2x positive weight the optimum differs.
    _, _, unweighted = _direct_minimum(X_pos, X_neg, pos_weight=1.0)
    assert svm_objective(fit.w, fit.b, X_pos, X_neg, pos_weight=1.0)["total"] > unweighted + 1e-5


def _random_problem(seed: int, positives: int, negatives: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like rows scaled to a mean norm of 20, as train-svm scales its features."""
    rng = np.random.default_rng(seed)
    X_pos = (np.abs(rng.normal(size=(positives, dim))) + 0.3).astype(np.float32)
    X_neg = np.abs(rng.normal(size=(negatives, dim))).astype(np.float32)
    scale = np.float32(20 / np.linalg.norm(np.concatenate([X_pos, X_neg]), axis=1).mean())
    return X_pos * scale, X_neg * scale


def test_dense_solver_reaches_liblinears_optimum():
    X_pos, X_neg = _random_problem(0, 40, 2000, 300)
    theirs = fit_linear_svm(X_pos, X_neg, SvmSolver(tol=1e-5))
    ours = fit_linear_svm(X_pos, X_neg, SvmSolver(tol=1e-5, method="dense"))
    assert theirs.converged and ours.converged and ours.w.dtype == np.float32
    objective = svm_objective(ours.w, ours.b, X_pos, X_neg)["total"]
    assert objective == pytest.approx(svm_objective(theirs.w, theirs.b, X_pos, X_neg)["total"], rel=1e-5)
    assert objective < svm_objective(ours.w * 1.01, ours.b, X_pos, X_neg)["total"]  # a minimum, not a plateau
    np.testing.assert_allclose(ours.w, theirs.w, atol=2e-3 * np.abs(theirs.w).max())
    assert ours.b == pytest.approx(theirs.b, abs=2e-3 * max(abs(theirs.b), 1.0))


def test_dense_solver_reads_the_rows_in_place():
    import tracemalloc

    from stages.core.svm import Rows

    X_pos, X_neg = _random_problem(1, 30, 3000, 400)  # 4.8 MB of negatives
    blocks = (X_neg[:1000].copy(), X_neg[1000:].copy())
    order = np.random.default_rng(2).permutation(3000)  # rows named out of block order
    rows = Rows(blocks, (order >= 1000).astype(np.int64), np.where(order >= 1000, order - 1000, order))
    solver = SvmSolver(method="dense", seed=5)
    contiguous = fit_linear_svm(X_pos, X_neg[order], solver)
    fit_linear_svm(X_pos[:2], X_neg[:2], solver)  # compiled, before measuring
    tracemalloc.start()
    try:
        in_place = fit_linear_svm(X_pos, rows, solver)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Same rows in the same order, so the same visits: the same bits. No copy of the 4.8 MB on the way.
    assert np.array_equal(in_place.w, contiguous.w) and in_place.b == contiguous.b
    assert peak < 0.1 * X_neg.nbytes, peak
    again = fit_linear_svm(X_pos, rows, solver)
    assert np.array_equal(again.w, in_place.w)  # seeded: the same SVM on every run
    assert not np.array_equal(fit_linear_svm(X_pos, rows, SvmSolver(method="dense", seed=6)).w, in_place.w)
    with pytest.raises(ValueError, match="out of range"):  # numba would read past the block, silently
        fit_linear_svm(X_pos, Rows(blocks, np.array([0, 1]), np.array([5, 2000])), solver)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        fit_linear_svm(X_pos, Rows((X_neg[:, :400:2].astype(np.float64),), np.zeros(1, np.int64), np.zeros(1, np.int64)),
                       solver)


def test_fit_needs_both_labels():
    X_pos, X_neg = _toy_problem()
    with pytest.raises(ValueError):
        fit_linear_svm(X_pos, X_neg[:0])


# -- pruning ----------------------------------------------------------------------------------------------------------
def test_dedup_keeps_the_first_window_of_each_cell_rectangle_and_scale():
    cells = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]])
    scale_index = np.array([0, 1, 0, 0, 1, 2])
    assert T.dedup_windows(cells, scale_index).tolist() == [0, 1, 3, 5]
    assert T.dedup_windows(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_overlap70_is_greedy_against_kept_windows_only():
    boxes = np.array([
        [0, 0, 10, 10],  # 0: kept (first)
        [0, 0, 10, 13],  # 1: IoU with 0 = 10/13 > 0.7 -> removed
        [0, 0, 10, 16],  # 2: IoU with 0 = 0.625; with 1 = 13/16 > 0.7, but 1 was removed -> kept
        [50, 50, 60, 60],  # 3: far away -> kept
        [0, 0, 7, 10],  # 4: IoU with 0 exactly 0.7 (not > 0.7) -> kept
    ], dtype=float)
    assert T.prune_overlapping(boxes).tolist() == [0, 2, 3, 4]


def test_negative_candidates_per_pruning_mode():
    # Rows 0-1 are duplicates (same cells, same scale); row 2 overlaps row 0 by 0.8; row 3 overlaps class 1's GT.
    boxes = np.array([[0, 0, 10, 10], [0.5, 0, 10, 10], [0, 0, 10, 12.5], [40, 40, 50, 50]], dtype=float)
    overlaps = np.array([[0.0, 0.1], [0.0, 0.1], [0.0, 0.2], [0.1, 0.9]], dtype=np.float32)
    cells = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 2], [5, 5, 6, 6]])
    scale_index = np.zeros(4, dtype=np.int64)
    active = np.array([True, True])
    none = T.negative_candidates(overlaps, boxes, active, 0.3, "none")
    assert none[:, 0].tolist() == [True] * 4 and none[:, 1].tolist() == [True, True, True, False]
    dedup = T.negative_candidates(overlaps, boxes, active, 0.3, "dedup", cells, scale_index)
    assert dedup[:, 0].tolist() == [True, False, True, True] and dedup[:, 1].tolist() == [True, False, True, False]
    paper = T.negative_candidates(overlaps, boxes, active, 0.3, "overlap70")
    # Row 1: IoU with row 0 = 0.95 -> removed; row 2: IoU with row 0 = 0.8 -> removed; per class independently.
    assert paper[:, 0].tolist() == [True, False, False, True] and paper[:, 1].tolist() == [True, False, False, False]
    inactive = T.negative_candidates(overlaps, boxes, np.array([True, False]), 0.3, "none")
    assert not inactive[:, 1].any()
    with pytest.raises(Exception, match="pruning"):
        T.negative_candidates(overlaps, boxes, active, 0.3, "sometimes")


# -- the mining schedule ----------------------------------------------------------------------------------------------
def _image(index, values, candidates=None, num_classes=2):
    values = np.asarray(values, dtype=np.float32)
    if candidates is None:
        candidates = np.ones((len(values), num_classes), dtype=bool)
    return T.ImageNegatives(index, values[:, None], np.arange(len(values)), np.asarray(candidates, dtype=bool))


class _RecordingFit:
    """Every fit returns w = [1], b = 0 (so a window's score is its feature value) and records what it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, k, X_pos, X_neg):
        self.calls.append((k, np.asarray(X_neg)[:, 0].astype(np.float64).round(6).tolist()))  # float32 -> exact decimals
        return SvmFit(np.array([1.0], dtype=np.float32), 0.0, 1, True)


def test_mining_schedule_by_hand():
    fit = _RecordingFit()
    stream = [
        _image(0, [-3.0, -1.1, 0.5]),  # first image: all 3 added; retrain; -3 (< -1.2) evicted
        _image(1, [-1.0, -1.00005, -2.0, 0.2], [[1, 0], [1, 0], [1, 0], [0, 0]]),  # hard: -1.0, -1.00005 (> -1.0001)
        _image(2, [0.1, 0.3]),  # +2: 4 added since the last retrain > 3 -> retrain on 6
        _image(3, [-5.0]),  # not hard, nothing added; last image -> retrain again on the same 6
    ]
    positives = [np.ones((2, 1), np.float32), np.zeros((0, 1), np.float32)]  # class 1 has no positives
    miner = T.mine_hard_negatives(stream, positives, fit, T.MiningSchedule(-1.0001, -1.2, 3),
                                  objective=lambda w, b, P, N: {"total": float(len(N))})
    assert [k for k, _ in fit.calls] == [0, 0, 0]  # the class without positives is never trained
    assert fit.calls[0][1] == [-3.0, -1.1, 0.5]
    assert fit.calls[1][1] == [-1.1, 0.5, -1.0, -1.00005, 0.1, 0.3]
    assert fit.calls[2][1] == fit.calls[1][1]
    cache = miner.caches[0]
    assert [(r.image_index, r.negatives, r.evicted) for r in cache.retrains] == [(0, 3, 1), (2, 6, 0), (3, 6, 0)]
    assert [r.objective["total"] for r in cache.retrains] == [3.0, 6.0, 6.0]
    assert miner.added == [(0, 0, 3), (1, 0, 2), (2, 0, 2)]
    assert cache.num_negatives == 6 and miner.trained.tolist() == [True, False]
    assert miner.caches[1].num_negatives == 0
    keys = cache.consolidate()[1]
    assert keys.tolist() == [[0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1]]


def test_mining_scores_with_the_model_from_before_the_image_and_skips_cached_keys():
    fit = _RecordingFit()
    miner = T.HardNegativeMiner([np.ones((1, 1), np.float32)], fit, T.MiningSchedule(-1.0001, -1.2, 100))
    miner.add_image(_image(0, [-0.5], num_classes=1), is_last=False)
    assert miner.W[0, 0] == 1.0 and len(fit.calls) == 1
    miner.add_image(_image(0, [-0.5, 0.4], num_classes=1), is_last=False)  # same image again: row 0 is cached
    assert miner.added[-1] == (0, 0, 1) and miner.caches[0].num_negatives == 2
    miner.add_image(_image(5, [-1.2, -1.0], num_classes=1), is_last=True)  # -1.2 is not hard; -1.0 is
    assert miner.added[-1] == (5, 0, 1) and len(fit.calls) == 2 and fit.calls[-1][1] == [-0.5, 0.4, -1.0]


@pytest.mark.parametrize("method", ["liblinear", "dense"])
def test_mining_with_real_svms_is_the_same_with_parallel_workers(method):
    """Big enough that the three classes' fits overlap in time: liblinear's random generator is process-wide, so
    fits in threads gave different SVMs from run to run (seen on the embedded set); svm_fitter uses processes for it
    (threads for the dense solver, whose generator is the fit's own)."""
    rng = np.random.default_rng(3)
    dim = 48

    def stream():
        for i in range(5):
            feats = rng.normal(0, 1, (400, dim)).astype(np.float32) * 5
            yield T.ImageNegatives(i, feats, np.arange(400), rng.random((400, 3)) < 0.7)

    positives = [(rng.normal(0.3, 1, (40, dim)) * 5).astype(np.float32) for _ in range(3)]
    images = list(stream())
    solver = SvmSolver(seed=0, method=method)
    schedule = T.MiningSchedule(retrain_limit=300)

    def fit(k, X_pos, X_neg):
        return fit_linear_svm(X_pos, X_neg, solver)

    serial = T.mine_hard_negatives(images, positives, fit, schedule, workers=1)
    with svm_fitter(solver, workers=3) as pooled:
        parallel = T.mine_hard_negatives(images, positives, lambda k, X_pos, X_neg: pooled(X_pos, X_neg), schedule,
                                         workers=3)
    np.testing.assert_array_equal(serial.W, parallel.W)
    np.testing.assert_array_equal(serial.b, parallel.b)
    assert all(len(c.retrains) >= 2 for c in serial.caches)  # first image + last image at least
    for k, cache in enumerate(serial.caches):  # after the final eviction, no cached negative scores below -1.2
        X_neg, _ = cache.consolidate()
        assert (X_neg @ serial.W[:, k] + serial.b[k] >= -1.2 - 1e-5).all()


def test_forked_fit_equals_the_fit_here_and_hands_back_its_errors():
    from stages.core.svm import fit_in_fork

    rng = np.random.default_rng(1)
    X_pos = rng.normal(1, 1, (20, 5)).astype(np.float32)
    X_neg = rng.normal(-1, 1, (200, 5)).astype(np.float32)
    here, there = fit_linear_svm(X_pos, X_neg), fit_in_fork(X_pos, X_neg, SvmSolver())
    assert np.array_equal(here.w, there.w) and here.b == there.b and here.n_iter == there.n_iter
    with pytest.raises(ValueError, match="needs positives and negatives"):
        fit_in_fork(X_pos, X_neg[:0], SvmSolver())


def test_svm_model_file_round_trip(tmp_path):
    model = SvmModel(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0.5, -np.inf], np.float32), "ftfc7",
                       0.25, 80.0, ("a", "b"), (480, 688), (1, 2, 3, 6), np.array([True, False]))
    path = tmp_path / "svm.npz"
    save_svm_model(path, model)
    loaded = load_svm_model(path)
    assert loaded.classes == ("a", "b") and loaded.feature == "ftfc7" and loaded.scales == (480, 688)
    np.testing.assert_array_equal(loaded.W, model.W)
    scores = loaded.scores(np.array([[4.0, 0.0, 0.0]]))  # x * 0.25 = [1, 0, 0]
    assert scores[0, 0] == pytest.approx(0.5) and scores[0, 1] == -np.inf


# -- the stage end to end on a tiny devkit ------------------------------------------------------------------------------
def build_tiny_run(tmp_path, n_images=4, **sets):
    """A run with proposals (imported boxes), a random ZF-5 'pretrained' and 'fine-tuned' checkpoint (fc 32-d) and
    the conv5 cache of trainval at two scales. Returns (cfg, dataset)."""
    from conftest import jittered_and_random_proposals, write_devkit
    from stages import extract_features, proposals
    from stages.core import nets
    from stages.core.artifacts import Run
    from stages.core.config import build_config
    from stages.core.voc import VocDataset

    rng = np.random.default_rng(0)
    images, boxes_voc = {}, {}
    for k in range(n_images):
        img = (rng.random((72, 96, 3)) * 60).astype(np.uint8)
        x0, y0 = 4 + 3 * k, 6 + 2 * k
        img[y0:y0 + 30, x0:x0 + 36] = (210, 40, 40)
        img[40:66, 50:90] = (40, 200, 60)
        red, green = (x0 + 1, y0 + 1, x0 + 36, y0 + 30), (51, 41, 90, 66)
        objects = [("red", red, False), ("green", green, k == 1)]
        if k == 2:
            objects.append(("red", (60, 4, 92, 30), False))
        images[f"im{k}"] = (img, objects)
        # Proposals: jittered copies of the GT (regression samples) and random boxes (negatives), 1-based inclusive.
        boxes_voc[f"im{k}"] = jittered_and_random_proposals(rng, objects)
    devkit = write_devkit(tmp_path / "devkit", images, {"trainval": list(images)}, classes=("red", "green"))
    np.savez(tmp_path / "boxes.npz", **boxes_voc)
    overrides = {"runs_root": str(tmp_path / "runs"), "run": "r", "data.dataset": "voc2007",
                 "data.voc_root": str(devkit), "proposals.workers": 1, "proposals.min_side": 8,
                 "features.scales": [64, 96], "features.one_scale": 96, "features.flip": False,
                 "model.fc_dim": 32, "svm.workers": 1, "device": "cpu"}
    overrides.update(sets)
    cfg = build_config(None, overrides)
    run = Run(cfg.run_dir)
    proposals.run(cfg, "trainval", boxes_file=tmp_path / "boxes.npz")
    torch.manual_seed(0)
    for stage, classes in (("pretrain", 10), ("finetune", 3)):
        net = nets.build_sppnet("zf5", fc_dim=32, num_classes=classes)
        for layer in (net.head.fc6, net.head.fc7):  # wider than N(0, 0.01) so that fc features are not all ~0
            torch.nn.init.normal_(layer.weight, 0.0, 0.05)
        folder = run.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        nets.save_checkpoint(folder / "model.pt", net, {})
        run.write_manifest(stage, None, config={"test": stage}, inputs={}, outputs={"model": "model.pt"})
    extract_features.run(cfg, "trainval")
    return cfg, VocDataset(devkit)


def _mean_norm_over_all_windows(cfg, feature, scales):
    """With <= 200 images of <= 200 rows each, the statistic covers every window: recompute it directly."""
    from stages.core import fcfeatures
    from stages.core.artifacts import Run
    from stages.core.features import features_for
    from stages.core.roidb import build_roidb
    from stages.core.voc import VocDataset
    from stages.core.proposals import load_proposals

    run = Run(cfg.run_dir)
    cache, store = features_for(run, "trainval"), load_proposals(run, "trainval")
    nets, _ = fcfeatures.load_feature_nets(run, feature, cfg, "cpu")
    norms = []
    for rois in build_roidb(VocDataset(cfg.data.voc_root), "trainval", store):
        feats = fcfeatures.window_features(cache, rois.image_id, rois.boxes, feature, nets, scales, cfg=cfg)
        norms.append(np.linalg.norm(feats.double().numpy(), axis=1))
    return float(np.concatenate(norms).mean())


def test_stage_end_to_end_on_a_tiny_devkit(caplog, tmp_path):
    from stages.core import fcfeatures
    from stages.core.artifacts import Run
    from stages.core.errors import StageInputMissing
    from stages.core.features import features_for

    cfg, _ = build_tiny_run(tmp_path)
    run = Run(cfg.run_dir)

    # window_features against the cache's own pooling and the head's own forward.
    cache = features_for(run, "trainval")
    nets, manifests = fcfeatures.load_feature_nets(run, "ftfc7", cfg, "cpu")
    assert list(nets) == ["finetuned"] and list(manifests) == ["finetune"]
    boxes = np.array([[0, 0, 40, 30], [10, 20, 90, 70], [50, 40, 90, 66], [3, 3, 9, 9.0]])
    pool5 = fcfeatures.window_features(cache, "im0", boxes, "pool5", {}, cfg=cfg)
    torch.testing.assert_close(pool5, cache.pooled("im0", boxes, (1, 2, 3, 6)))
    one = fcfeatures.window_features(cache, "im0", boxes, "pool5", {}, (96,), cfg=cfg)
    torch.testing.assert_close(one, cache.pooled("im0", boxes, (1, 2, 3, 6), scales_subset=(96,)))
    with torch.no_grad():
        expected = nets["finetuned"].head.features(pool5, "fc7")
    torch.testing.assert_close(fcfeatures.window_features(cache, "im0", boxes, "ftfc7", nets, cfg=cfg, batch=3),
                               expected, rtol=1e-4, atol=1e-4)  # BLAS sums differ slightly with the batch size
    with pytest.raises(Exception, match=r"holds scales \[64, 96\], not \[50\]"):
        fcfeatures.window_features(cache, "im0", boxes, "pool5", {}, (50,), cfg=cfg)
    result = T.run(cfg, feature="ftfc7")
    assert not result.skipped and result.manifest.path == run.manifest_path("svm", "ftfc7-s2")
    model = load_svm_model(result.manifest.output("svm"))
    assert model.W.shape == (32, 2) and model.classes == ("red", "green") and model.scales == (64, 96)
    assert model.trained.all() and np.isfinite(model.b).all()
    metrics = result.manifest.metrics
    assert metrics["classes"]["red"]["positives"] == 5 and metrics["classes"]["green"]["positives"] == 4
    assert metrics["all_converged"] and metrics["classes"]["red"]["rounds"] >= 2  # after image 1 and the last
    assert metrics["mean_norm"] == pytest.approx(_mean_norm_over_all_windows(cfg, "ftfc7", (64, 96)), rel=1e-5)
    assert model.feature_scale == pytest.approx(20 / metrics["mean_norm"])
    assert "red" in result.summary and "objective" in result.summary
    assert metrics["cache_evicted_for_memory"] == 0 and metrics["cache_windows"] > 0
    assert metrics["peak_memory_gb"]["self"] > 0 and "peak memory" in result.summary

    again = T.run(cfg, feature="ftfc7")
    assert again.skipped and again.manifest.fingerprint == result.manifest.fingerprint
    # The windows the SVMs were mined from are an input: new proposals make them stale.
    inputs = result.manifest.data["inputs"]
    assert set(inputs) >= {"features", "proposals", "finetune", "dataset"}
    assert inputs["proposals"]["fingerprint"] == run.require("proposals", "trainval").fingerprint

    # pool5 at one scale with the paper's pruning: another tag, 12800-d weights.
    paper = dataclasses.replace(cfg, svm=dataclasses.replace(cfg.svm, pruning="overlap70"))
    one = T.run(paper, feature="pool5", one_scale=True)
    assert one.manifest.path == run.manifest_path("svm", "pool5-s1")
    pool5 = load_svm_model(one.manifest.output("svm"))
    assert pool5.W.shape == (256 * 50, 2) and pool5.scales == (96,) and pool5.feature == "pool5"
    assert one.manifest.data["config"]["svm"]["pruning"] == "overlap70"

    # A bound below the cache the run above ended with (so it is reached): the easiest negatives go, and it says so.
    tight = dataclasses.replace(cfg, svm=dataclasses.replace(
        cfg.svm, max_cache_gb=(metrics["cache_windows"] // 2) * 32 * 4 / 2 ** 30))
    with caplog.at_level("WARNING"):
        bounded = T.run(tight, feature="ftfc7")
    assert not bounded.skipped and bounded.manifest.metrics["cache_evicted_for_memory"] > 0
    assert bounded.manifest.metrics["cache_windows"] <= metrics["cache_windows"] // 2
    assert any("evicted to keep the cache within svm.max_cache_gb" in r.getMessage() for r in caplog.records)
    assert load_svm_model(bounded.manifest.output("svm")).trained.all()

    # A changed upstream makes the SVMs stale for their consumers, and the missing one names its command.
    run.invalidate("finetune")
    with pytest.raises(StageInputMissing, match="spp finetune"):
        T.run(cfg, feature="ftfc6")


# -- the shared negative store against today's per-class caches --------------------------------------------------------
class PerClassMiner:
    """Reference: the mining as it was before the shared store (each class kept its own float32 copy of every
    negative it cached). Same schedule, same dedup by (image_index, row), same eviction, fits one at a time. The
    shared-store miner must give the same SVMs to the bit, the same retrain log and the same caches."""

    def __init__(self, positives, fit, schedule=T.MiningSchedule(), objective=svm_objective):
        self.dim = next(np.asarray(p).reshape(len(p), -1).shape[1] for p in positives if len(p))
        self.positives = [np.asarray(p, dtype=np.float32).reshape(-1, self.dim) for p in positives]
        count = len(self.positives)
        self.active = np.array([len(p) > 0 for p in self.positives])
        self.W, self.b = np.zeros((self.dim, count), np.float32), np.zeros(count, np.float32)
        self.trained = np.zeros(count, dtype=bool)
        self.fit, self.schedule, self.objective = fit, schedule, objective
        self.features = [[] for _ in range(count)]  # per class: float32 chunks, in the order they were cached
        self.keys = [[] for _ in range(count)]
        self.key_sets = [set() for _ in range(count)]
        self.num_added = [0] * count
        self.retrains = [[] for _ in range(count)]
        self.first_image, self.added = True, []

    def cache(self, k):
        dim = self.dim
        if len(self.features[k]) != 1:
            self.features[k] = [np.concatenate(self.features[k]) if self.features[k]
                                else np.zeros((0, dim), np.float32)]
            self.keys[k] = [np.concatenate(self.keys[k]) if self.keys[k] else np.zeros((0, 2), np.int64)]
        return self.features[k][0], self.keys[k][0]

    def add_image(self, sample, is_last):
        candidates = np.asarray(sample.candidates, dtype=bool) & self.active[None, :]
        if not self.first_image and len(sample.features):
            candidates &= (sample.features @ self.W + self.b) > self.schedule.hard_thresh
        for k in np.flatnonzero(candidates.any(axis=0)):
            picked = np.flatnonzero(candidates[:, k])
            keys = np.column_stack([np.full(len(picked), sample.image_index, np.int64),
                                    np.asarray(sample.rows, dtype=np.int64)[picked]])
            fresh = np.array([(int(i), int(r)) not in self.key_sets[k] for i, r in keys], dtype=bool)
            picked, keys = picked[fresh], keys[fresh]
            if len(picked) == 0:
                continue
            self.features[k].append(np.asarray(sample.features[picked], dtype=np.float32))
            self.keys[k].append(keys)
            self.key_sets[k].update((int(i), int(r)) for i, r in keys)
            self.num_added[k] += len(picked)
            self.added.append((sample.image_index, int(k), len(picked)))
        due = [k for k in range(len(self.positives))
               if self.active[k] and sum(len(x) for x in self.features[k]) > 0
               and (self.first_image or self.num_added[k] > self.schedule.retrain_limit or is_last)]
        self.first_image = False
        for k in due:
            X_neg, keys = self.cache(k)
            fitted = self.fit(k, self.positives[k], X_neg)
            self.W[:, k], self.b[k], self.trained[k], self.num_added[k] = fitted.w, fitted.b, True, 0
            objective = self.objective(fitted.w, fitted.b, self.positives[k], X_neg)
            keep = X_neg @ np.asarray(fitted.w, dtype=np.float32) + np.float32(fitted.b) >= self.schedule.evict_thresh
            self.features[k], self.keys[k] = [X_neg[keep]], [keys[keep]]
            self.key_sets[k] = {(int(i), int(r)) for i, r in keys[keep]}
            self.retrains[k].append(T.Retrain(sample.image_index, len(X_neg), int((~keep).sum()), objective,
                                              fitted.n_iter, fitted.converged))
        return due


def _mine(miner, stream):
    """Feed ``stream`` to ``miner`` as ``mine_hard_negatives`` does (the last image by look-ahead)."""
    images = list(stream)
    for index, sample in enumerate(images):
        miner.add_image(sample, is_last=index == len(images) - 1)
    return miner


def _overlapping_problem(seed=7, dim=24, classes=5, images=9):
    """Seeded windows whose candidate sets overlap between classes (most negatives are shared), post-ReLU-like
    features (zeros included), class 4 without positives, and image 2 visited twice (its keys are cached again)."""
    rng = np.random.default_rng(seed)
    stream = []
    for i in range(images):
        count = int(rng.integers(120, 220))
        feats = (np.maximum(rng.normal(0.0, 1.0, (count, dim)), -0.3) * 4).astype(np.float32)
        feats[feats < 0] = 0.0
        rows = np.sort(rng.choice(400, count, replace=False))
        stream.append(T.ImageNegatives(i, feats, rows, rng.random((count, classes)) < 0.6))
    stream.insert(5, stream[2])  # a revisit: the same windows, the same keys
    centre = rng.normal(0.0, 1.0, dim)
    positives = [np.maximum(rng.normal(0.5, 1.0, (12, dim)) + centre * (k % 2), 0).astype(np.float32) * 4
                 for k in range(classes - 1)] + [np.zeros((0, dim), np.float32)]
    return stream, positives


def _assert_same_mining(miner, reference):
    np.testing.assert_array_equal(miner.trained, reference.trained)
    assert np.array_equal(miner.W, reference.W) and np.array_equal(miner.b, reference.b)
    assert miner.added == reference.added
    for k, cache in enumerate(miner.caches):
        assert cache.retrains == reference.retrains[k]  # image, negatives, evicted, objective, n_iter, converged
        X_neg, keys = cache.consolidate()
        X_ref, keys_ref = reference.cache(k)
        assert np.array_equal(keys, keys_ref) and np.array_equal(X_neg, X_ref)


def test_shared_store_gives_the_per_class_caches_svms_to_the_bit():
    stream, positives = _overlapping_problem()
    solver = SvmSolver(seed=0)
    schedule = T.MiningSchedule(retrain_limit=100)

    def fit(k, X_pos, X_neg):
        return fit_linear_svm(X_pos, X_neg, solver)

    reference = _mine(PerClassMiner(positives, fit, schedule), stream)
    rounds = [len(r) for r in reference.retrains]
    assert min(rounds[:4]) >= 3 and max(rounds) >= 5 and rounds[4] == 0  # retrains beyond the first and last image
    assert sum(r.evicted for log in reference.retrains for r in log) > 100  # evictions after retrains
    assert sum(i == 2 for i, _, _ in reference.added) > 4  # the revisit of image 2 caches some of its keys again
    miner = T.mine_hard_negatives(stream, positives, fit, schedule)
    _assert_same_mining(miner, reference)

    # The same with fits in forked processes, a bound that caps them at two at a time and is never reached by the
    # store: still the same SVMs (the bound changes nothing until the store would exceed it).
    bound = 2.5 * max(miner._fit_bytes(k, miner.caches[k].negative_ids()) for k in range(4))
    with svm_fitter(solver, workers=3) as pooled:
        bounded = T.HardNegativeMiner(positives, lambda k, X_pos, X_neg: pooled(X_pos, X_neg), schedule, workers=3,
                                      max_cache_bytes=bound)
        caps, parallel_fits = [], bounded.parallel_fits  # (classes due, fits at once) of every retrain
        bounded.parallel_fits = lambda classes: caps.append((len(classes), parallel_fits(classes))) or caps[-1][1]
        _mine(bounded, stream)
    assert bounded.evicted_for_memory == 0 and max(bounded.store.nbytes, miner.store.nbytes) < bound
    assert caps[-1] == (4, 2) and all(1 <= cap <= min(3, due) for due, cap in caps)  # the last: the largest sets
    _assert_same_mining(bounded, reference)


def test_shared_store_holds_each_window_once():
    stream, positives = _overlapping_problem()
    miner = T.mine_hard_negatives(stream, positives, lambda k, X_pos, X_neg: fit_linear_svm(X_pos, X_neg),
                                  T.MiningSchedule(retrain_limit=100))
    store = miner.store
    held = {}  # key -> classes holding it
    for cache in miner.caches:
        for key in map(tuple, cache.consolidate()[1].tolist()):
            held[key] = held.get(key, 0) + 1
        assert set(map(tuple, cache.consolidate()[1].tolist())) == cache.key_set
    live = store.holders > 0
    assert sorted(map(tuple, store.keys[live].tolist())) == sorted(held)  # each held window once
    assert [held[key] for key in map(tuple, store.keys[live].tolist())] == store.holders[live].tolist()
    assert (~live).sum() < T.COMPACT_DEAD_FRACTION * len(store)  # freed at the retrains
    assert sum(c.num_negatives for c in miner.caches) > 1.4 * len(store)  # per-class copies: 40% more rows here
    assert store.nbytes == len(store) * store.row_bytes


def test_negative_store_add_gather_release_compact():
    store = T.NegativeStore(2)
    first = store.add(np.array([[1, 0], [2, 0], [3, 3]], np.float32), np.array([[0, 5], [0, 6], [0, 9]]))
    second = store.add(np.array([[4, 0], [5, 5]], np.float32), np.array([[1, 0], [1, 2]]))
    assert first.tolist() == [0, 1, 2] and second.tolist() == [3, 4] and store.nonzeros.tolist() == [1, 1, 2, 1, 2]
    assert store.gather([4, 0, 3, 2])[:, 0].tolist() == [5, 1, 4, 3]  # across blocks, in the order asked
    assert store.lookup(np.array([[1, 2], [0, 7]])).tolist() == [4, -1]
    store.hold(np.array([0, 1, 2, 3, 4]))
    store.hold(np.array([1, 3]))
    store.release(np.array([0, 1, 3, 4]))  # rows 0 and 4: no holder left
    assert store.holders.tolist() == [0, 1, 1, 1, 0] and store.lookup(np.array([[0, 5], [1, 2]])).tolist() == [-1, -1]
    new_ids = store.compact()
    assert new_ids.tolist() == [-1, 0, 1, 2, -1] and len(store) == 3 and store.nbytes == 3 * 8
    assert store.gather([2, 0, 1])[:, 0].tolist() == [4, 2, 3] and store.keys.tolist() == [[0, 6], [0, 9], [1, 0]]
    store.release(np.array([2]))
    assert len(store.compact()) == 3 and len(store.blocks) == 1  # an emptied block is dropped


class _SignedFit:
    """Class 0 gets w = [1], class 1 w = [-1] (b = 0): a window's score is its value for class 0, minus it for 1."""

    def __init__(self):
        self.calls = []

    def __call__(self, k, X_pos, X_neg):
        self.calls.append((k, np.asarray(X_neg)[:, 0].astype(np.float64).round(6).tolist()))
        return SvmFit(np.array([1.0 if k == 0 else -1.0], dtype=np.float32), 0.0, 1, True)


def test_rows_left_alive_do_not_keep_compacted_blocks():
    # A retrain once held its last class's rows across the compaction that followed: the old blocks stayed alive
    # beside their compacted copies, a second store (16 GiB of pool5 on VOC with an 8 GiB bound).
    import weakref

    store = T.NegativeStore(3)
    ids = store.add(np.arange(12, dtype=np.float32).reshape(4, 3), np.array([[0, r] for r in range(4)]))
    store.add(np.ones((2, 3), np.float32), np.array([[1, 0], [1, 1]]))
    store.hold(ids[:2])
    rows = store.rows(ids[:2])
    np.testing.assert_array_equal(rows.gather(), [[0, 1, 2], [3, 4, 5]])
    first, second = weakref.ref(store.blocks[0]), weakref.ref(store.blocks[1])
    store.compact()  # block 0 loses rows 2 and 3, block 1 all of its rows
    assert first() is None and second() is None and rows is not None
    np.testing.assert_array_equal(store.gather(np.arange(2)), [[0, 1, 2], [3, 4, 5]])


def test_memory_bound_evicts_the_windows_easiest_for_all_their_classes():
    fit = _SignedFit()
    positives = [np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)]
    miner = T.HardNegativeMiner(positives, fit, T.MiningSchedule(-1.0001, -1.2, 100), max_cache_bytes=4 * 4)
    miner.add_image(_image(0, [0.1, 0.2]), is_last=False)  # both classes; 2 windows stored once
    assert len(miner.store) == 2 and miner.store.holders.tolist() == [2, 2]
    # Scores (class 0, class 1) = (v, -v). Row 0 is hard for class 1 only; row 1 and 3 are candidates of one class.
    miner.add_image(_image(1, [-2.0, -0.9, 0.8, 0.5, -0.3], [[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]]), is_last=True)
    # 7 windows, room for 4: the 3 whose highest score over their holders is lowest go: image 1's rows 1 (-0.9) and
    # 3 (-0.5), image 0's row 0 (0.1). Row 4 (-0.3 / 0.3) and image 1's row 0 (held by class 1 at 2.0) stay.
    assert miner.evicted_for_memory == 3 and len(miner.store) == 4 and miner.store.nbytes <= 16
    assert fit.calls[-2:] == [(0, [0.2, 0.8, -0.3]), (1, [0.2, -2.0, 0.8, -0.3])]
    assert miner.caches[0].key_set == {(0, 1), (1, 2), (1, 4)}
    assert miner.caches[1].key_set == {(0, 1), (1, 0), (1, 2), (1, 4)}
    assert miner.added == [(0, 0, 2), (0, 1, 2), (1, 0, 3), (1, 1, 4)]  # the schedule counts what was cached


def test_memory_bound_caps_the_fits_running_at_once():
    import threading
    import time

    dim, n_neg = 8, 30
    running, most = [0], [0]
    lock = threading.Lock()

    def fit(k, X_pos, X_neg):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return SvmFit(np.zeros(dim, np.float32), 0.0, 1, True)

    positives = [np.ones((2, dim), np.float32)] * 4
    sample = T.ImageNegatives(0, np.full((n_neg, dim), 0.5, np.float32), np.arange(n_neg), np.ones((n_neg, 4), bool))
    # Per class: fit_memory_bytes (float64 copy, liblinear's nodes; the rows are passed in place); every value nonzero.
    per_fit = fit_memory_bytes(2 + n_neg, dim, (2 + n_neg) * dim)
    assert per_fit == 8 * 32 * 8 + 16 * (32 * 8 + 2 * 32)
    for bound, expected in ((math.inf, 4), (2.5 * per_fit, 2), (1.2 * per_fit, 1)):
        most[0] = 0
        miner = T.HardNegativeMiner(positives, fit, workers=4, max_cache_bytes=bound)
        assert miner.parallel_fits([0]) == 1
        miner.add_image(sample, is_last=False)
        assert miner.parallel_fits([0, 1, 2, 3]) == expected and most[0] <= expected
        assert miner.evicted_for_memory == 0  # the store (960 bytes) and each fit are within every bound here


def test_memory_bound_fits_a_class_on_its_hardest_negatives_that_fit():
    # A liblinear fit copies its training set (float64, liblinear's 16-byte nodes): 1-d, one positive, each row
    # costs 8 + 16 x 3 = 56 bytes. Room for 3 negatives (and 50 bytes to spare); the store (4 bytes a window) is far
    # from the bound.
    fit = _RecordingFit()
    bound = 56 + 3 * 56 + 50
    miner = T.HardNegativeMiner([np.ones((1, 1), np.float32)], fit, T.MiningSchedule(-1.0001, -1.2, 100),
                                max_cache_bytes=bound)
    miner.add_image(_image(0, [0.1, 0.2], num_classes=1), is_last=False)  # 2 negatives fit: fitted on both
    assert fit.calls[-1] == (0, [0.1, 0.2]) and miner.evicted_for_memory == 0
    miner.add_image(_image(1, [0.9, -0.5, 0.5, 0.3, -0.9], num_classes=1), is_last=True)
    # 7 cached, room for 3: the 3 highest scores of the model so far (w = [1]), in the cache's order
    assert fit.calls[-1] == (0, [0.9, 0.5, 0.3]) and miner.evicted_for_memory == 4
    assert miner.caches[0].key_set == {(1, 0), (1, 2), (1, 3)} and len(miner.store.compact()) == 3
    assert miner._fit_bytes(0, miner.caches[0].negative_ids()) <= bound

    # The dense solver copies nothing (56 bytes of its own per row, 16 for the weights): all 7 fit, none leaves.
    fit = _RecordingFit()
    miner = T.HardNegativeMiner([np.ones((1, 1), np.float32)], fit, T.MiningSchedule(-1.0001, -1.2, 100),
                                max_cache_bytes=8 * 56 + 16,
                                fit_bytes=lambda rows, dim, nonzeros: fit_memory_bytes(rows, dim, nonzeros, "dense"))
    miner.add_image(_image(0, [0.1, 0.2], num_classes=1), is_last=False)
    miner.add_image(_image(1, [0.9, -0.5, 0.5, 0.3, -0.9], num_classes=1), is_last=True)
    assert fit.calls[-1] == (0, [0.1, 0.2, 0.9, -0.5, 0.5, 0.3, -0.9]) and miner.evicted_for_memory == 0


def test_max_cache_gb_is_checked_and_recorded():
    from stages.core.config import build_config
    from stages.core.errors import SppError

    assert build_config(None, {"svm.max_cache_gb": 2}).svm.max_cache_gb == 2.0
    for bad in (0, -1.0):
        with pytest.raises(SppError, match="svm.max_cache_gb"):
            build_config(None, {"svm.max_cache_gb": bad})
    record = T._config_record(build_config(None, {}), "pool5", False, (688,))
    assert record["svm"]["max_cache_gb"] == 8.0  # it can change the SVMs, so it is part of their config
    # The solver too, but the default only by its absence: runs made before the choice existed stay up to date.
    assert "solver" not in record["svm"]
    dense = T._config_record(build_config(None, {"svm.solver": "dense"}), "pool5", False, (688,))
    assert dense["svm"]["solver"] == "dense"
    with pytest.raises(SppError, match="svm.solver"):
        build_config(None, {"svm.solver": "sgd"})
