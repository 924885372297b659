"""``spp detect``: score every proposal with the class SVMs, per-class NMS, optional box regression (SPEC §6-7).

Inputs: proposals and conv5 features of the split, the SVMs of a variant (and its box regressors), the nets that
the variant's features need. Outputs: ``06_detect/<tag>/comp4_det_<split>_<class>.txt`` (devkit format) and
``detections.npz`` (every kept detection: image index, class, score, box in sppnet's convention); the manifest's
metrics hold the run's ``profile`` (``core.timing``: seconds per phase, start-up to writing).
The scoring itself is ``core.scoring.Scorer``; ``stages.detector`` applies the same to any image
(``spp detect --images``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .core import fccompress, fcfeatures
from .core.artifacts import Run, StageResult, atomic_write_bytes
from .core.errors import SppError
from .core.logs import progress
from .core.nets import resolve_device
from .core.proposals import load_proposals
from .core.registry import command_for_path, detect_tag
from .core.runner import Produced, StagePlan, execute
from .core.scoring import Scorer
from .core.timing import PhaseTimer, profile, profile_line
from .core.voc import write_comp4


def run(cfg, split: str, feature: str = "ftfc7", one_scale: bool = False, started: float | None = None
        ) -> StageResult:
    """``started``: ``time.perf_counter()`` at process start (the CLI's), where the profile's start-up begins;
    default now."""
    from .core.features import cache_of

    started = time.perf_counter() if started is None else started
    run_dir = Run(cfg.run_dir)
    device = resolve_device(cfg.device)
    timer = PhaseTimer(device)
    n_scales = len(cfg.features.scales)
    use_bbox = bool(cfg.detect.bbox)
    tag = detect_tag(split, feature, one_scale, n_scales, use_bbox)
    features_manifest = fcfeatures.features_manifest(run_dir, split, feature)
    if cfg.detect.test_flip and not features_manifest.data.get("config", {}).get("features", {}).get("flip"):
        # Checked before anything is loaded or undone: detections already made stay as they are.
        raise SppError(f"detect.test_flip needs the mirrored maps of split {split!r}, and its feature cache has "
                       f"none: run `{command_for_path(features_manifest.path)} --set detect.test_flip=true`",
                       features_manifest.path)
    with timer("load"):
        scorer = Scorer(cfg, run_dir, feature, one_scale, use_bbox, device)
    proposals_manifest = run_dir.require("proposals", split)
    inputs = {"proposals": proposals_manifest, "features": features_manifest, **scorer.net_manifests}
    if scorer.svm_manifest is not None:
        inputs["svm"] = scorer.svm_manifest
    if scorer.bbox_manifest is not None:
        inputs["bbox"] = scorer.bbox_manifest
    config = {"detect": fccompress.detect_record(cfg.detect, uses_fc=bool(fcfeatures.required_nets(feature))),
              "features": cfg.section("features"), "feature": feature,
              "one_scale": one_scale, "split": split}
    plan = StagePlan("detect", tag, config, inputs, {"comp4_dir": "comp4", "detections": "detections.npz"})

    def detect(out_dir: Path) -> Produced:
        with timer("load"):
            proposals = load_proposals(run_dir, split)
            cache = cache_of(features_manifest)
        classes = scorer.models.classes
        per_class: list[list] = [[] for _ in classes]
        rows = []
        image_ids = proposals.image_ids
        start = time.perf_counter()
        timer.add("startup", start - started - timer.seconds["load"])
        with cache, torch.inference_mode():  # closed after: a rerun of extract-features in this process reuses it
            for image_index, image_id in enumerate(progress(image_ids, desc=f"detect {tag}", unit="img", leave=False)):
                with timer("read"):
                    height, width = cache.image_hw(image_id)
                    boxes = proposals.boxes(image_id)
                dets = scorer.score(cache, image_id, boxes, (width, height), timer=timer)
                with timer("write"):  # collected here, written below
                    for k, (kept_boxes, kept_scores) in enumerate(dets):
                        for box, score in zip(kept_boxes, kept_scores):
                            per_class[k].append((image_id, float(score), box))
                            rows.append((image_index, k, float(score), *box))
        with timer("write"):
            for k, name in enumerate(classes):
                write_comp4(out_dir / "comp4", split, name, per_class[k])
            table = np.array(rows, dtype=np.float64).reshape(-1, 7)
            _save_npz(out_dir / "detections.npz", image_ids=np.array(image_ids), classes=np.array(classes),
                      image_index=table[:, 0].astype(np.int64), label=table[:, 1].astype(np.int64),
                      score=table[:, 2], boxes=table[:, 3:7])
        end = time.perf_counter()
        seconds = end - start
        return Produced({"images": len(image_ids), "detections": int(len(table)), "seconds": seconds,
                         "images_per_s": len(image_ids) / max(seconds, 1e-9), "device": str(device),
                         "profile": profile(timer, len(image_ids), end - started)})

    def describe(m: dict) -> str:
        line = (f"detect {tag}: {m['detections']} detections on {m['images']} images ({m['images_per_s']:.2f} "
                f"img/s, {m['device']}) -> {run_dir.stage_dir('detect', tag) / 'comp4'}")
        return f"{line}\n{profile_line(m['profile'])}" if "profile" in m else line

    return execute(run_dir, plan, detect, describe=describe, cfg=cfg)


def _save_npz(path: Path, **arrays) -> None:
    import io
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
