"""``spp train-bbox``: whitening and its inverse, ridge (primal = dual = streamed Gram = direct solve), sample
selection on a hand case, a regression round trip that recovers the GT boxes, model-file round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages import train_bbox as TB
from stages.core import boxes as B
from stages.core.bboxreg import BboxModel, apply_bbox, load_bbox_model, save_bbox_model
from stages.core.roidb import image_rois
from stages.core.voc import Annotation


def test_whitening_decorrelates_and_its_inverse_undoes_it():
    rng = np.random.default_rng(0)
    targets = rng.normal(0, 1, (500, 4)) @ np.array([[0.1, 0, 0, 0], [0.05, 0.2, 0, 0], [0, 0, 0.3, 0.1],
                                                     [0, 0.02, 0, 0.25]]) + np.array([0.01, -0.02, 0.1, 0.0])
    mu, T, T_inv = TB.whitening(targets)
    np.testing.assert_allclose(mu, targets.mean(0))
    np.testing.assert_allclose(T @ T_inv, np.eye(4), atol=1e-12)
    white = (targets - mu) @ T
    covariance = white.T @ white / len(white)
    # Exactly V diag(D / (D + 0.001)) V^T: close to identity, shrunk slightly along low-variance directions.
    eigvals, eigvecs = np.linalg.eigh((targets - mu).T @ (targets - mu) / len(targets))
    np.testing.assert_allclose(covariance, eigvecs @ np.diag(eigvals / (eigvals + 0.001)) @ eigvecs.T, atol=1e-12)
    assert np.abs(covariance - np.eye(4)).max() < 0.1
    np.testing.assert_allclose(white @ T_inv + mu, targets, atol=1e-12)


def test_whitening_of_degenerate_targets_stays_finite():
    mu, T, T_inv = TB.whitening(np.tile([[0.1, 0.2, 0.0, 0.0]], (3, 1)))  # zero covariance: T = I / sqrt(0.001)
    np.testing.assert_allclose(T, np.eye(4) / np.sqrt(0.001), atol=1e-12)
    np.testing.assert_allclose(T_inv @ T, np.eye(4), atol=1e-12)


@pytest.mark.parametrize("n, d", [(7, 20), (30, 5)])
def test_ridge_primal_dual_and_direct_solve_agree(n, d):
    rng = np.random.default_rng(n)
    A = TB.with_bias(torch.from_numpy(rng.normal(0, 3, (n, d))))
    Y = torch.from_numpy(rng.normal(0, 1, (n, 4)))
    lam = 4.0
    direct = np.linalg.solve(A.numpy().T @ A.numpy() + lam * np.eye(d + 1), A.numpy().T @ Y.numpy())
    np.testing.assert_allclose(TB.ridge_primal(A, Y, lam).numpy(), direct, atol=1e-10)
    np.testing.assert_allclose(TB.ridge_dual(A, Y, lam).numpy(), direct, atol=1e-10)
    np.testing.assert_allclose(TB.ridge_regression(A, Y, lam).numpy(), direct, atol=1e-10)
    assert A[:, -1].eq(1).all()  # the bias column, regularised with the rest (lam I covers it)


def test_train_class_streamed_gram_equals_the_small_system():
    rng = np.random.default_rng(1)
    dim, n = 6, 40
    X = rng.random((n, dim)).astype(np.float32)
    targets = rng.normal(0, 0.2, (n, 4))
    chunks = [X[:15], X[15:31], X[31:]]
    streamed = TB.train_class(lambda: iter(chunks), targets, 0.5, 3.0, dim)  # n >= dim + 1: Gram path
    mu, T, T_inv = TB.whitening(targets)
    A = TB.with_bias(torch.from_numpy(X.astype(np.float64) * 0.5))
    beta = TB.ridge_dual(A, torch.from_numpy((targets - mu) @ T), 3.0).numpy()
    np.testing.assert_allclose(streamed[0], beta, atol=1e-10)
    np.testing.assert_allclose(streamed[4], (A.numpy() @ beta) @ T_inv + mu, atol=1e-10)
    with pytest.raises(ValueError, match="rows"):
        TB.train_class(lambda: iter(chunks[:2]), targets, 0.5, 3.0, dim)


def test_regression_samples_use_the_best_gt_of_any_class_with_strict_iou():
    # GT 0 (class 1) [0,0,100,10), GT 1 (class 0) [60,0,160,10). Proposals [x,0,x+100,10) slide between them.
    ann = Annotation("im", 200, 20, np.array([[0, 0, 100, 10.0], [60, 0, 160, 10.0]]), np.array([1, 0]),
                     np.array([False, True]))
    proposals = np.array([[x, 0, x + 100, 10.0] for x in (20, 30, 40, 50)] + [[0, 0, 50, 10.0]])
    # IoU with GT 0: 80/120, 70/130, 60/140, 50/150, 50/100; with GT 1: 60/140, 70/130, 80/120, 90/110, 0.
    rows, gt_boxes, labels, ious = TB.regression_samples(image_rois(ann, proposals, 2), 0.5)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5]  # both GT rows; [0,0,50,10) has IoU 0.5 exactly: out (strict >)
    assert labels.tolist() == [1, 0, 1, 1, 0, 0]  # a difficult GT is a regression target too
    np.testing.assert_allclose(gt_boxes[3], [0, 0, 100, 10])  # x=30 ties (70/130 each): the first GT (class 1)
    np.testing.assert_allclose(gt_boxes[4], [60, 0, 160, 10])
    assert ious[0] == 1.0 and ious[2] == pytest.approx(80 / 120) and ious[5] == pytest.approx(90 / 110)


def _random_boxes(rng, n, width=300, height=200):
    x1, y1 = rng.uniform(0, width / 2, n), rng.uniform(0, height / 2, n)
    return np.stack([x1, y1, x1 + rng.uniform(20, width / 2, n), y1 + rng.uniform(20, height / 2, n)], axis=1)


def test_regression_round_trip_recovers_the_ground_truth():
    """Features that encode the exact targets (scaled up so that lambda's shrinkage is negligible): the fitted
    regressor maps every proposal back onto its GT box through whitening, its inverse and apply_bbox_deltas."""
    rng = np.random.default_rng(2)
    n, image_wh = 60, (400, 300)
    proposals = _random_boxes(rng, n)
    gt_boxes = proposals + rng.normal(0, 4, (n, 4))
    targets = B.bbox_targets(proposals, gt_boxes)
    features = (1e6 * np.hstack([targets, np.ones((n, 1)), np.zeros((n, 3))])).astype(np.float64)
    dim = features.shape[1]
    beta, mu, T, T_inv, fitted = TB.train_class(lambda: iter([features]), targets, 1.0, 4000.0, dim)
    model = BboxModel(beta=beta[None], mu=mu[None], T=T[None], T_inv=T_inv[None], feature_scale=1.0,
                         mean_norm=20.0, samples=np.array([n]), classes=("thing",), scales=(688,), pyramid=(1,),
                         lam=4000.0, min_iou=0.5)
    predicted = apply_bbox(model, 0, features, proposals, image_wh)
    np.testing.assert_allclose(predicted, B.clip_boxes(gt_boxes, *image_wh), atol=1e-3)
    np.testing.assert_allclose(fitted, targets, atol=1e-6)
    # The same features with a huge lambda shrink the whitened predictions to 0: boxes move by the mean target only.
    beta0, mu0, T0, Tinv0, _ = TB.train_class(lambda: iter([features]), targets, 1.0, 1e30, dim)
    model0 = BboxModel(beta0[None], mu0[None], T0[None], Tinv0[None], 1.0, 20.0, np.array([n]), ("thing",),
                          (688,), (1,), 1e30, 0.5)
    shifted = B.apply_bbox_deltas(proposals, np.tile(targets.mean(0), (n, 1)))
    np.testing.assert_allclose(apply_bbox(model0, 0, features, proposals, image_wh),
                               B.clip_boxes(shifted, *image_wh), atol=1e-6)


def test_apply_bbox_scales_features_clips_and_reads_the_npz(tmp_path):
    dim = 3
    beta = np.zeros((2, dim + 1, 4))
    beta[1, 0, 0] = 1.0  # class 1: t_x = 1 * (feature_0 * scale) in whitened units; T_inv = I, mu = 0
    model = BboxModel(beta, np.zeros((2, 4)), np.tile(np.eye(4), (2, 1, 1)), np.tile(np.eye(4), (2, 1, 1)),
                         feature_scale=0.5, mean_norm=40.0, samples=np.array([0, 5]), classes=("a", "b"),
                         scales=(480, 688), pyramid=(1, 2), lam=4000.0, min_iou=0.5)
    path = tmp_path / "bbox.npz"
    save_bbox_model(path, model)
    loaded = load_bbox_model(path)
    assert loaded.classes == ("a", "b") and loaded.scales == (480, 688) and loaded.feature_scale == 0.5
    boxes = np.array([[10, 10, 30, 20.0], [80, 0, 100, 10.0]])
    feats = np.array([[2.0, 0, 0], [2.0, 0, 0]])  # scaled: t_x = 1 -> move right by one width (20)
    out = apply_bbox(loaded, 1, feats, boxes, (110, 50))  # the loaded model is what detect passes
    np.testing.assert_allclose(out, [[30, 10, 50, 20], [100, 0, 110, 10]])  # second one clipped at W = 110
    np.testing.assert_allclose(apply_bbox(loaded, 0, feats, boxes, (110, 50)), boxes)  # untrained: identity
    assert apply_bbox(loaded, 1, np.zeros((0, dim)), np.zeros((0, 4)), (110, 50)).shape == (0, 4)


def test_sample_spill_round_trip(tmp_path):
    spill = TB.SampleSpill(tmp_path / "s.h5", dim=5, num_classes=3)
    a, b = np.arange(15, dtype=np.float32).reshape(3, 5), np.ones((4, 5), np.float32)
    spill.append(2, a)
    spill.append(2, b)
    assert spill.counts.tolist() == [0, 0, 7]
    np.testing.assert_array_equal(np.concatenate(list(spill.chunks(2, rows=3))), np.vstack([a, b]))
    assert list(spill.chunks(0)) == []
    spill.close()
    assert not (tmp_path / "s.h5").exists()


# -- the stage end to end ----------------------------------------------------------------------------------------------
def _all_windows_mean_norm(cfg, dataset):
    from stages.core import fcfeatures
    from stages.core.artifacts import Run
    from stages.core.features import features_for
    from stages.core.roidb import build_roidb
    from stages.core.proposals import load_proposals

    run = Run(cfg.run_dir)
    cache = features_for(run, "trainval")
    norms = [np.linalg.norm(fcfeatures.window_features(cache, r.image_id, r.boxes, "pool5", {}, cfg=cfg).double()
                            .numpy(), axis=1) for r in build_roidb(dataset, "trainval", load_proposals(run, "trainval"))]
    return float(np.concatenate(norms).mean())


def test_stage_end_to_end_on_a_tiny_devkit(tmp_path):
    import dataclasses

    from test_train_svm import build_tiny_run

    from stages.core import fcfeatures
    from stages.core.artifacts import Run
    from stages.core.features import features_for
    from stages.core.roidb import build_roidb
    from stages.core.proposals import load_proposals

    cfg, dataset = build_tiny_run(tmp_path)
    cfg = dataclasses.replace(cfg, bbox=dataclasses.replace(cfg.bbox, lam=1e-3))  # a small lambda: visible fit
    run = Run(cfg.run_dir)
    result = TB.run(cfg)
    assert result.manifest.path == run.manifest_path("bbox", "s2")
    model = load_bbox_model(result.manifest.output("bbox"))
    assert model.beta.shape == (2, 256 * 50 + 1, 4) and model.classes == ("red", "green")
    assert (result.manifest.folder / TB.SPILL_FILE).exists() is False  # the spill file is gone

    # Reference: gather every sample independently, solve the ridge problem with numpy, compare.
    cache, store = features_for(run, "trainval"), load_proposals(run, "trainval")
    X, P, G, labels = [], [], [], []
    for rois in build_roidb(dataset, "trainval", store):
        rows, gt_boxes, row_labels, _ = TB.regression_samples(rois, 0.5)
        X.append(fcfeatures.window_features(cache, rois.image_id, rois.boxes[rows], "pool5", {}, cfg=cfg).numpy())
        P.append(rois.boxes[rows]), G.append(gt_boxes), labels.append(row_labels)
    X, P, G, labels = (np.concatenate(a) for a in (X, P, G, labels))
    assert model.samples.tolist() == np.bincount(labels, minlength=2).tolist() and model.samples.min() > 0
    assert model.mean_norm == pytest.approx(_all_windows_mean_norm(cfg, dataset), rel=1e-6)  # <= 200 rows each
    for k, name in enumerate(("red", "green")):
        sel = labels == k
        targets = B.bbox_targets(P[sel], G[sel])
        mu, T, _ = TB.whitening(targets)
        A = np.hstack([X[sel].astype(np.float64) * model.feature_scale, np.ones((sel.sum(), 1))])
        # (A^T A + lam I)^-1 A^T Y written as A^T (A A^T + lam I)^-1 Y (the 12801^2 system is too slow for a test;
        # primal = dual is checked on small problems above).
        beta = A.T @ np.linalg.solve(A @ A.T + 1e-3 * np.eye(len(A)), (targets - mu) @ T)
        np.testing.assert_allclose(model.beta[k], beta, rtol=1e-5, atol=1e-7 * np.abs(beta).max())
        moved = apply_bbox(model, k, X[sel], P[sel], (96, 72))
        iou_before = B.paired_iou(P[sel], G[sel]).mean()
        iou_after = B.paired_iou(moved, G[sel]).mean()
        assert iou_after > iou_before  # on its own training windows
        assert result.manifest.metrics["classes"][name]["samples"] == sel.sum()
        assert result.manifest.metrics["classes"][name]["iou_before"] == pytest.approx(iou_before)
    assert TB.run(cfg).skipped
    one = TB.run(cfg, one_scale=True)
    assert one.manifest.path == run.manifest_path("bbox", "s1")
    assert load_bbox_model(one.manifest.output("bbox")).scales == (96,)
