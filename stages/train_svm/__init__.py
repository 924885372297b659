"""``spp train-svm``: one linear SVM per class on window features, with hard-negative mining (SPEC §5).

The released algorithm [S:spp_train.m, the same as R:rcnn_train.m]:

- Features (``fcfeatures``): pool5 / fc6 / fc7 / ftfc6 / ftfc7 of each window at its best scale, multiplied by
  ``20 / mean_norm`` (mean L2 norm over <= 200 random images x <= 200 random windows, seed 3). With
  ``detect.fc_compression`` set, fc features come from the compressed fc6/fc7 that detect uses too
  (``core/fccompress.py``), and the setting is part of the stage's config record.
- Positives: the class's GT boxes, difficult ones included. Negatives: every row (proposals and other classes'
  GT) whose IoU with all of the class's GT is < 0.3.
- Negative pruning (``svm.pruning``): "dedup" (code: one window per unique (conv5 cell rectangle, scale); the
  first in row order), "overlap70" (paper: drop a negative whose IoU with an already kept negative of the class
  exceeds 0.7, greedy in row order: GT rows, then proposals in their stored order) or "none".
- Mining, one pass over the training images in split order: image 1 adds every negative; later images add the
  uncached negatives scoring above -1.0001. A class is retrained after image 1, whenever it has gathered more than
  2000 new negatives, and after the last image; after each retrain its cached negatives scoring below -1.2 are
  evicted. Scores of one image come from the models as they were before that image.
- Solver: liblinear L2-regularised hinge loss, dual (``-s 3 -c 1e-3 -w1 2 -B 10``) through sklearn's LinearSVC,
  whose objective is ``0.5|w|^2 + 0.5 (b/10)^2 + C [2 sum_pos hinge + sum_neg hinge]`` (``svm_objective``).
  ``svm.solver = "dense"``: the same solver on the cached float32 rows in place (``core.dense_svm``; liblinear
  copies each training set into float64 and its own nodes, 6x the rows when dense).

Features of an image are computed once for all classes; every class's candidates are scored with one matmul, and
the classes due for a retrain are fitted in parallel, each liblinear fit in a process of its own
(``core.svm.svm_fitter``: liblinear's random generator is process-wide, so threads would make the SVMs vary from run
to run), each dense fit in a thread. Only the caches of
hard negatives are held, never all negatives of all images, and each cached window's features once, however many
classes hold it (``NegativeStore``); ``svm.max_cache_gb`` bounds that cache, each fit and the fits running at once.
A killed run leaves no manifest and restarts clean.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core import fccompress, fcfeatures
from ..core.artifacts import Run, StageResult
from ..core.errors import SppError
from ..core.fcfeatures import training_images
from ..core.features import cache_of
from ..core.logs import progress
from ..core.nets import resolve_device
from ..core.proposals import load_proposals
from ..core.roidb import build_roidb
from ..core.runner import Produced, StagePlan, execute
from ..core.svm import (SvmModel, SvmSolver, fit_memory_bytes, save_svm_model, svm_fitter, svm_objective)
from ..core.registry import svm_tag
from ..core.voc import VocDataset

try:
    import resource  # peak memory in the metrics; Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

log = logging.getLogger(__name__)

from .mining import (COMPACT_DEAD_FRACTION, FC_BATCH, GIB, OVERLAP_PRUNE_IOU, PRUNING_MODES, SVM_FILE, ClassCache,
                     HardNegativeMiner, ImageNegatives, MiningSchedule, NegativeStore, Retrain, dedup_windows,
                     mine_hard_negatives, negative_candidates, prune_overlapping)

__all__ = ["COMPACT_DEAD_FRACTION", "FC_BATCH", "GIB", "OVERLAP_PRUNE_IOU", "PRUNING_MODES", "SVM_FILE", "ClassCache",
           "HardNegativeMiner", "ImageNegatives", "MiningSchedule", "NegativeStore", "Retrain", "dedup_windows",
           "mine_hard_negatives", "negative_candidates", "prune_overlapping", "collect_positives", "negative_stream",
           "run"]

# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class _Context:
    """Everything the passes over the training images share."""

    dataset: VocDataset
    split: str
    proposals: object
    cache: object
    feature: str
    nets: dict
    scales: tuple[int, ...]
    pyramid: tuple[int, ...]
    rule: str
    device: object

    def rois(self, image_id: str):
        return build_roidb(self.dataset, self.split, self.proposals, image_ids=[image_id])[0]

    def features(self, maps, boxes: np.ndarray, scale_index: np.ndarray | None = None) -> np.ndarray:
        pooled = fcfeatures.pool_windows(maps, boxes, self.pyramid, scale_index=scale_index, rule=self.rule,
                                         quantized=fcfeatures.takes_quantized_rows(self.feature, self.nets))
        return fcfeatures.head_features(pooled, self.feature, self.nets, FC_BATCH).cpu().numpy()


def collect_positives(ctx: _Context, image_ids: Sequence[str], num_classes: int) -> list[np.ndarray]:
    """Unscaled features of every GT box (difficult included), per class [S:spp_train.m get_positive_*]."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image_id in progress(image_ids, desc="svm positives", unit="img"):
        rois = ctx.rois(image_id)
        gt_rows = np.flatnonzero(rois.is_gt)
        if len(gt_rows) == 0:
            continue
        maps = fcfeatures.load_maps(ctx.cache, image_id, ctx.scales, device=ctx.device)
        feats = ctx.features(maps, rois.boxes[gt_rows])
        for feat, label in zip(feats, rois.gt_label[gt_rows]):
            per_class[int(label)].append(feat)
    dim = None
    for feats in per_class:
        if feats:
            dim = len(feats[0])
    if dim is None:
        raise SppError(f"split {ctx.split!r} has no ground-truth boxes to train on", ctx.dataset.split_path(ctx.split))
    return [np.stack(f).astype(np.float32) if f else np.zeros((0, dim), np.float32) for f in per_class]


def negative_stream(ctx: _Context, image_ids: Sequence[str], active: np.ndarray, scale: float, neg_iou: float,
                    pruning: str) -> Iterator[ImageNegatives]:
    """Per image: the pruned negative candidates of every active class and their scaled features."""
    for index, image_id in enumerate(progress(image_ids, desc="svm mining", unit="img")):
        rois = ctx.rois(image_id)
        maps = fcfeatures.load_maps(ctx.cache, image_id, ctx.scales, device=ctx.device)
        scale_index, cells = fcfeatures.window_cells(maps, rois.boxes, ctx.rule)
        candidates = negative_candidates(rois.overlaps, rois.boxes, active, neg_iou, pruning, cells, scale_index)
        rows = np.flatnonzero(candidates.any(axis=1))
        feats = ctx.features(maps, rois.boxes[rows], scale_index[rows]) * np.float32(scale)
        yield ImageNegatives(index, feats.astype(np.float32, copy=False), rows, candidates[rows])


def _config_record(cfg, feature: str, one_scale: bool, scales: tuple[int, ...]) -> dict:
    svm = {k: v for k, v in cfg.section("svm").items() if k != "workers"}  # workers do not change results
    if svm.get("solver") == "liblinear":
        del svm["solver"]  # the default, recorded only when another (so runs made before the choice stay up to date)
    return {"feature": feature, "one_scale": one_scale, "scales": list(scales), "train_split": cfg.data.train_split,
            "svm": svm, "scale_rule": cfg.features.scale_rule, "pyramid": list(cfg.model.pyramid),
            "backbone": cfg.model.backbone, "seed": cfg.seed,
            # fc features of compressed fc6/fc7 (detect.fc_compression): recorded only when in use
            **fccompress.compression_record(cfg.detect, uses_fc=bool(fcfeatures.required_nets(feature)))}


def _summary(metrics: dict) -> str:
    compressed = metrics.get("fc_compression")  # detect.fc_compression, when the features used it
    lines = [f"SVMs on {metrics['feature']}{f' (fc6/fc7 {compressed})' if compressed else ''} ({metrics['images']} "
             f"images, scales {metrics['scales']}, pruning {metrics['pruning']}); feature scale "
             f"{metrics['feature_scale']:.4f} (mean norm {metrics['mean_norm']:.3f})",
             f"{'class':>14} {'pos':>6} {'neg fit':>8} {'cache':>7} {'rounds':>6} {'objective':>10}  converged"]
    for name, c in metrics["classes"].items():
        objective = "-" if c["objective"] is None else f"{c['objective']:.4f}"
        converged = "-" if not c["trained"] else "yes" if c["converged"] else "NO"
        lines.append(f"{name:>14} {c['positives']:>6} {c['negatives']:>8} {c['cache']:>7} {c['rounds']:>6} "
                     f"{objective:>10}  {converged}")
    peak = metrics.get("peak_memory_gb")
    if peak:
        lines.append(f"peak memory {peak['self']:.2f} GiB (this process), {peak['children']:.2f} GiB (its largest "
                     f"child, e.g. a forked fit); {metrics['cache_windows']} windows cached at the end")
    if not metrics["all_converged"]:
        lines.append("warning: some liblinear fits hit svm.max_iter; raise it or loosen svm.tol")
    return "\n".join(lines)


def peak_memory_gb() -> dict | None:
    """Peak resident memory, in GiB, of this process so far ("self": `spp train-svm` runs in a process of its own)
    and of its largest finished child ("children": with svm.workers > 1, the forked fits). None without ``resource``
    (Windows)."""
    if resource is None:
        return None
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {who: round(resource.getrusage(which).ru_maxrss * unit / GIB, 3)
            for who, which in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}


def run(cfg, feature: str = "ftfc7", one_scale: bool = False) -> StageResult:
    """Train the SVMs of one variant; writes ``04_svm/<feature>-s<n>/svm.npz`` and its manifest."""
    tag = svm_tag(feature, one_scale, len(cfg.features.scales))
    run_dir = Run(cfg.run_dir)
    split = cfg.data.train_split
    scales = (int(cfg.features.one_scale),) if one_scale else tuple(int(s) for s in cfg.features.scales)
    dataset = VocDataset.from_config(cfg.data)
    inputs = {"features": fcfeatures.features_manifest(run_dir, split, feature),  # --conv models: their own conv5
              "proposals": run_dir.require("proposals", split),
              **fcfeatures.feature_net_inputs(run_dir, feature),
              "dataset": {"split": split, "fingerprint": dataset.fingerprint(split)}}
    config = _config_record(cfg, feature, one_scale, scales)
    plan = StagePlan("svm", tag, config, inputs, {"svm": SVM_FILE})
    return execute(run_dir, plan, lambda folder: _train(cfg, run_dir, dataset, inputs, feature, scales, folder),
                   describe=_summary, cfg=cfg)


def _train(cfg, run_dir: Run, dataset: VocDataset, inputs: dict, feature: str, scales: tuple[int, ...],
           out_dir: Path) -> Produced:
    split = cfg.data.train_split
    device = resolve_device(cfg.device)
    cache = cache_of(inputs["features"])
    fcfeatures.scales_for(cache, scales)
    nets, _ = fcfeatures.load_feature_nets(run_dir, feature, cfg, device, expect_backbone=cache.backbone)
    ctx = _Context(dataset, split, load_proposals(run_dir, split), cache, feature, nets, scales,
                   fcfeatures.feature_pyramid(nets, cfg.model.pyramid), cfg.features.scale_rule, device)
    image_ids = training_images(dataset, split, cache)
    classes = tuple(dataset.classes)

    scale, mean_norm = fcfeatures.feature_scale(
        cache, lambda image_id: ctx.rois(image_id).boxes, image_ids, feature, nets, scales, device, FC_BATCH,
        pyramid=ctx.pyramid, rule=ctx.rule, target_norm=cfg.svm.target_norm)
    positives = [p * np.float32(scale) for p in collect_positives(ctx, image_ids, len(classes))]
    active = np.array([len(p) > 0 for p in positives])

    solver = SvmSolver.from_config(cfg.svm, cfg.seed)
    schedule = MiningSchedule(cfg.svm.hard_thresh, cfg.svm.evict_thresh, cfg.svm.retrain_every)

    def objective(w, b, X_pos, X_neg):
        return svm_objective(w, b, X_pos, X_neg, solver.C, solver.pos_weight, solver.bias_multiplier)

    workers = cfg.svm.workers or os.cpu_count() or 1
    with svm_fitter(solver, workers) as fit:  # classes due together are fitted in parallel
        miner = mine_hard_negatives(
            negative_stream(ctx, image_ids, active, scale, cfg.svm.neg_iou, cfg.svm.pruning), positives,
            fit=lambda k, X_pos, X_neg: fit(X_pos, X_neg), schedule=schedule, objective=objective,
            workers=workers, max_cache_bytes=cfg.svm.max_cache_gb * GIB,
            fit_bytes=lambda rows, dim, nonzeros: fit_memory_bytes(rows, dim, nonzeros, solver.method))

    b = miner.b.copy()
    b[~miner.trained] = -np.inf  # no positives (or no negatives): no detector, so no detections
    model = SvmModel(miner.W, b, feature, scale, mean_norm, classes, scales, ctx.pyramid, miner.trained.copy())
    save_svm_model(out_dir / SVM_FILE, model)

    metrics = {"feature": feature, "scales": list(scales), "pruning": cfg.svm.pruning, "images": len(image_ids),
               "dim": int(miner.dim), "feature_scale": scale, "mean_norm": mean_norm, "classes": {},
               **fccompress.compression_record(cfg.detect, uses_fc=bool(nets))}
    for name, cache_k, trained in zip(classes, miner.caches, miner.trained):
        last = cache_k.retrains[-1] if cache_k.retrains else None
        metrics["classes"][name] = {
            "positives": len(cache_k.positives), "negatives": last.negatives if last else 0,
            "cache": cache_k.num_negatives, "rounds": len(cache_k.retrains),
            "objective": last.objective["total"] if last else None,
            "objective_terms": last.objective if last else None,
            "converged": bool(trained) and all(r.converged for r in cache_k.retrains),
            "max_n_iter": max((r.n_iter for r in cache_k.retrains), default=0), "trained": bool(trained)}
    metrics["all_converged"] = all(c["converged"] for c in metrics["classes"].values() if c["trained"])
    metrics["untrained_classes"] = [n for n, c in metrics["classes"].items() if not c["trained"]]
    metrics["cache_windows"] = int((miner.store.holders > 0).sum())  # distinct windows cached at the end
    metrics["cache_evicted_for_memory"] = miner.evicted_for_memory  # 0: svm.max_cache_gb was never reached
    metrics["peak_memory_gb"] = peak_memory_gb()
    if metrics["untrained_classes"]:
        log.warning("no SVM for %s (no training positives)", ", ".join(metrics["untrained_classes"]))
    if miner.evicted_for_memory:
        log.warning("%d easy negatives evicted to keep the cache within svm.max_cache_gb=%g; the SVMs differ from "
                    "unbounded mining", miner.evicted_for_memory, cfg.svm.max_cache_gb)
    return Produced(metrics)
