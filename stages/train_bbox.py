"""``spp train-bbox``: per-class ridge regressors from pooled conv5 features to box corrections (SPEC §6).

The released recipe [S:bbox_regression/spp_train_bbox_regressor.m, spp_predict_bbox_regressor.m]:

- Samples: every roidb row (proposals and GT boxes) whose IoU with some GT box is > ``bbox.min_iou`` (strict, as
  the code's ``O > min_overlap``). Its target box G is the GT with the highest IoU (any class, difficult included)
  and G's class picks the regressor. Targets ``(t_x, t_y, t_w, t_h)`` are ``boxes.bbox_targets(P, G)``.
- Features: pool5 (SPP-pooled conv5) at the window's best scale, scaled to a mean L2 norm of 20.
- Targets are centred and whitened, ``T = V diag(1/sqrt(D + 0.001)) V^T`` from their covariance ``V D V^T``.
- Ridge regression with a bias column of ones, regularised like the weights: the Cholesky solve of
  ``(A^T A + lambda I) beta = A^T Y`` (lambda 4000). With fewer samples than features the identical solution
  ``beta = A^T (A A^T + lambda I)^{-1} Y`` is used (Cholesky of the smaller matrix).
- Prediction (``core.bboxreg.apply_bbox``, where the model file is read and written): ``Y = (X beta) T^{-1} + mu``,
  then ``boxes.apply_bbox_deltas`` and clip to the image.

Per-image samples are spilled to a temporary HDF5 file in the stage folder, so memory holds one class at a time.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np
import torch

from .core import boxes as box_ops
from .core import fcfeatures, spp
from .core.artifacts import Run, StageResult
from .core.bboxreg import BboxModel, save_bbox_model
from .core.errors import SppError, require_free_space
from .core.fcfeatures import training_images
from .core.features import cache_of, features_tag
from .core.logs import progress
from .core.nets import resolve_device
from .core.proposals import load_proposals
from .core.roidb import best_gt, build_roidb
from .core.runner import Produced, StagePlan, execute
from .core.registry import bbox_tag
from .core.voc import VocDataset

BBOX_FILE = "bbox.npz"
SPILL_FILE = "samples.partial.h5"
WHITEN_EPS = 0.001  # T = V diag(1/sqrt(D + 0.001)) V^T [S:spp_train_bbox_regressor.m]
CHUNK_ROWS = 4096  # sample rows per Gram-accumulation step


# ------------------------------------------------------------------------------------------------ the maths
def whitening(targets: np.ndarray, eps: float = WHITEN_EPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, T, T_inv)`` of targets [n, 4]: ``(Y - mu) @ T`` has (almost) identity covariance; ``T_inv`` undoes T.
    The covariance is the population one (divided by n), as the released code computes it."""
    targets = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
    mu = targets.mean(axis=0)
    centred = targets - mu
    covariance = centred.T @ centred / len(targets)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    eigvals = np.maximum(eigvals, 0.0)  # clip round-off below zero
    T = eigvecs @ np.diag(1.0 / np.sqrt(eigvals + eps)) @ eigvecs.T
    T_inv = eigvecs @ np.diag(np.sqrt(eigvals + eps)) @ eigvecs.T
    return mu, T, T_inv


def with_bias(X: torch.Tensor) -> torch.Tensor:
    """``[X, 1]``: the bias column of ones (regularised like every other weight, as in the released code)."""
    return torch.cat([X, torch.ones((len(X), 1), dtype=X.dtype, device=X.device)], dim=1)


def ridge_primal(A: torch.Tensor, Y: torch.Tensor, lam: float) -> torch.Tensor:
    """``beta = (A^T A + lam I)^{-1} A^T Y`` by Cholesky (the released code's ``ridge_reg_chol``)."""
    return ridge_from_gram(A.T @ A, A.T @ Y, lam)


def ridge_from_gram(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """Solve ``(gram + lam I) beta = rhs`` with a Cholesky factorisation."""
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise SppError(f"ridge system is not positive definite (lambda {lam}); is bbox.lam > 0?")
    return torch.cholesky_solve(rhs, factor)


def ridge_dual(A: torch.Tensor, Y: torch.Tensor, lam: float) -> torch.Tensor:
    """The same solution from the n x n system: ``beta = A^T (A A^T + lam I)^{-1} Y`` (push-through identity
    ``(A^T A + lam I)^{-1} A^T = A^T (A A^T + lam I)^{-1}``); cheaper when n < number of columns."""
    return A.T @ ridge_from_gram(A @ A.T, Y, lam)


def ridge_regression(A: torch.Tensor, Y: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge solution through whichever Cholesky system is smaller."""
    return ridge_dual(A, Y, lam) if len(A) < A.shape[1] else ridge_primal(A, Y, lam)


# ------------------------------------------------------------------------------------------------ samples
def regression_samples(rois, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's training rows: ``(rows, gt_boxes, classes, ious)`` for rows whose best IoU with any GT box is
    > ``min_iou``; G is that GT box (first on ties) and its class picks the regressor."""
    gt_row, iou = best_gt(rois)
    rows = np.flatnonzero((gt_row >= 0) & (iou > min_iou))
    return rows, rois.boxes[gt_row[rows]], rois.gt_label[gt_row[rows]].astype(np.int64), iou[rows]


class SampleSpill:
    """Per-class feature rows appended to an HDF5 file (float32, lzf), read back in chunks one class at a time."""

    def __init__(self, path: Path, dim: int, num_classes: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.path, "w")
        self.dim, self.counts = int(dim), np.zeros(num_classes, dtype=np.int64)

    def append(self, class_index: int, rows: np.ndarray) -> None:
        require_free_space(self.path, 4 * self.dim * len(rows), "box-regression samples")
        name = str(int(class_index))
        if name not in self.file:
            self.file.create_dataset(name, shape=(0, self.dim), maxshape=(None, self.dim), dtype=np.float32,
                                     chunks=(max(1, min(256, (1 << 22) // (4 * self.dim))), self.dim),
                                     compression="lzf")
        data = self.file[name]
        start = data.shape[0]
        data.resize(start + len(rows), axis=0)
        data[start:] = rows
        self.counts[class_index] += len(rows)

    def chunks(self, class_index: int, rows: int = CHUNK_ROWS):
        data = self.file.get(str(int(class_index)))
        total = 0 if data is None else data.shape[0]
        for start in range(0, total, rows):
            yield data[start:start + rows]

    def close(self, remove: bool = True) -> None:
        self.file.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def train_class(read_chunks: Callable[[], Iterable[np.ndarray]], targets: np.ndarray, feature_scale: float,
                lam: float, dim: int, device: torch.device | str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One class's regressor from its unscaled features (``read_chunks()``: a fresh iterator over row chunks, in
    the order of ``targets`` [n, 4]): ``(beta [D+1, 4], mu, T, T_inv, fitted [n, 4])``, ``fitted`` being the
    model's predicted (unwhitened) targets on its own training samples."""
    n = len(targets)
    mu, T, T_inv = whitening(targets)
    whitened = torch.from_numpy((np.asarray(targets, np.float64) - mu) @ T).to(device)

    def scaled(chunk: np.ndarray) -> torch.Tensor:
        return with_bias(torch.from_numpy(np.asarray(chunk, np.float32)).to(device, torch.float64) * feature_scale)

    if n < dim + 1:  # fewer samples than unknowns: hold them and solve the n x n system
        A = scaled(np.concatenate(list(read_chunks())))
        beta = ridge_dual(A, whitened, lam)
        fitted = A @ beta
    else:  # accumulate the (D+1) x (D+1) Gram matrix chunk by chunk, then predict in a second pass
        gram = torch.zeros((dim + 1, dim + 1), dtype=torch.float64, device=device)
        rhs = torch.zeros((dim + 1, 4), dtype=torch.float64, device=device)
        start = 0
        for chunk in read_chunks():
            A = scaled(chunk)
            gram += A.T @ A
            rhs += A.T @ whitened[start:start + len(A)]
            start += len(A)
        if start != n:
            raise ValueError(f"{start} feature rows for {n} targets")
        beta = ridge_from_gram(gram, rhs, lam)
        fitted = torch.cat([scaled(chunk) @ beta for chunk in read_chunks()])
    return beta.cpu().numpy(), mu, T, T_inv, fitted.cpu().numpy() @ T_inv + mu


# ------------------------------------------------------------------------------------------------ the stage
def _config_record(cfg, one_scale: bool, scales: tuple[int, ...], conv_from: str) -> dict:
    return {"one_scale": one_scale, "scales": list(scales), "train_split": cfg.data.train_split,
            "bbox": cfg.section("bbox"), "scale_rule": cfg.features.scale_rule, "pyramid": list(cfg.model.pyramid),
            "backbone": cfg.model.backbone, "conv_from": conv_from}


def _summary(metrics: dict) -> str:
    lines = [f"box regressors on pool5 ({metrics['images']} images, scales {metrics['scales']}, lambda "
             f"{metrics['lam']:g}, IoU > {metrics['min_iou']:g}); feature scale {metrics['feature_scale']:.5f} "
             f"(mean norm {metrics['mean_norm']:.2f})",
             f"{'class':>14} {'samples':>8} {'train IoU before':>17} {'after':>7}"]
    for name, c in metrics["classes"].items():
        before = "-" if c["iou_before"] is None else f"{c['iou_before']:.3f}"
        after = "-" if c["iou_after"] is None else f"{c['iou_after']:.3f}"
        lines.append(f"{name:>14} {c['samples']:>8} {before:>17} {after:>7}")
    return "\n".join(lines)


def run(cfg, one_scale: bool = False, conv_from: str = "pretrain") -> StageResult:
    """Train the box regressors; writes ``05_bbox/s<n>/bbox.npz`` and its manifest. ``conv_from="finetune"``:
    on pool5 of the conv layers of ``spp finetune --conv`` (``05_bbox/s<n>+ftconv/``), for its ftfc7 detections."""
    tag = bbox_tag(one_scale, len(cfg.features.scales), conv_from)
    run_dir = Run(cfg.run_dir)
    split = cfg.data.train_split
    scales = (int(cfg.features.one_scale),) if one_scale else tuple(int(s) for s in cfg.features.scales)
    dataset = VocDataset.from_config(cfg.data)
    inputs = {"features": run_dir.require("features", features_tag(split, conv_from)),
              "proposals": run_dir.require("proposals", split),
              "dataset": {"split": split, "fingerprint": dataset.fingerprint(split)}}
    config = _config_record(cfg, one_scale, scales, conv_from)
    plan = StagePlan("bbox", tag, config, inputs, {"bbox": BBOX_FILE})
    return execute(run_dir, plan, lambda folder: _train(cfg, run_dir, dataset, inputs, scales, folder),
                   describe=_summary, cfg=cfg)


def _train(cfg, run_dir: Run, dataset: VocDataset, inputs: dict, scales: tuple[int, ...], out_dir: Path) -> Produced:
    split = cfg.data.train_split
    device = resolve_device(cfg.device)
    cache = cache_of(inputs["features"])
    fcfeatures.scales_for(cache, scales)
    proposals = load_proposals(run_dir, split)
    pyramid = tuple(int(n) for n in cfg.model.pyramid)
    rule = cfg.features.scale_rule
    image_ids = training_images(dataset, split, cache)
    classes = tuple(dataset.classes)

    def rois_of(image_id: str):
        return build_roidb(dataset, split, proposals, image_ids=[image_id])[0]

    scale, mean_norm = fcfeatures.feature_scale(
        cache, lambda image_id: rois_of(image_id).boxes, image_ids, "pool5", {}, scales, device,
        pyramid=pyramid, rule=rule, target_norm=cfg.bbox.target_norm)

    dim = spp.spp_dim(cache.spec.channels, pyramid)
    spill = SampleSpill(out_dir / SPILL_FILE, dim, len(classes))
    per_class: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in classes]  # (P, G) per image
    try:
        for image_id in progress(image_ids, desc="bbox samples", unit="img"):
            rois = rois_of(image_id)
            rows, gt_boxes, labels, _ = regression_samples(rois, cfg.bbox.min_iou)
            if len(rows) == 0:
                continue
            maps = fcfeatures.load_maps(cache, image_id, scales, device=device)
            feats = fcfeatures.pool_windows(maps, rois.boxes[rows], pyramid, rule=rule).cpu().numpy()
            for k in np.unique(labels):
                sel = labels == k
                spill.append(int(k), feats[sel])
                per_class[int(k)].append((rois.boxes[rows[sel]], gt_boxes[sel]))
        model_parts = _fit_all(spill, per_class, scale, cfg.bbox.lam, dim, device, classes)
    finally:
        spill.close(remove=True)
    betas, mus, Ts, T_invs, class_metrics = model_parts
    model = BboxModel(beta=betas, mu=mus, T=Ts, T_inv=T_invs, feature_scale=scale, mean_norm=mean_norm,
                      samples=spill.counts.copy(), classes=classes, scales=scales, pyramid=pyramid,
                      lam=float(cfg.bbox.lam), min_iou=float(cfg.bbox.min_iou))
    save_bbox_model(out_dir / BBOX_FILE, model)

    metrics = {"images": len(image_ids), "scales": list(scales), "lam": float(cfg.bbox.lam),
               "min_iou": float(cfg.bbox.min_iou), "feature_scale": scale, "mean_norm": mean_norm, "dim": dim,
               "classes": class_metrics, "untrained_classes": [c for c, m in class_metrics.items() if not m["samples"]]}
    return Produced(metrics)


def _fit_all(spill: SampleSpill, per_class, scale: float, lam: float, dim: int, device, classes: Sequence[str]):
    """Fit every class from the spilled samples; untrained classes get the identity regressor (zero deltas)."""
    K = len(classes)
    betas = np.zeros((K, dim + 1, 4))
    mus = np.zeros((K, 4))
    Ts = np.tile(np.eye(4), (K, 1, 1))
    T_invs = np.tile(np.eye(4), (K, 1, 1))
    metrics = {}
    for k, name in enumerate(progress(classes, desc="bbox ridge", unit="class")):
        if not per_class[k]:
            metrics[name] = {"samples": 0, "iou_before": None, "iou_after": None}
            continue
        proposals = np.concatenate([p for p, _ in per_class[k]])
        gt_boxes = np.concatenate([g for _, g in per_class[k]])
        targets = box_ops.bbox_targets(proposals, gt_boxes)
        betas[k], mus[k], Ts[k], T_invs[k], fitted = train_class(lambda: spill.chunks(k), targets, scale, lam, dim,
                                                                 device)
        predicted = box_ops.apply_bbox_deltas(proposals, fitted)
        metrics[name] = {"samples": len(proposals),
                         "iou_before": float(box_ops.paired_iou(proposals, gt_boxes).mean()),
                         "iou_after": float(box_ops.paired_iou(predicted, gt_boxes).mean())}
    return betas, mus, Ts, T_invs, metrics
