"""``spp detect``: score every proposal with the class SVMs, per-class NMS, optional box regression (SPEC §6-7).

Inputs: proposals and conv5 features of the split, the SVMs of a variant (and its box regressors), the nets that
the variant's features need. Outputs: ``06_detect/<tag>/comp4_det_<split>_<class>.txt`` (devkit format) and
``detections.npz`` (every kept detection: image index, class, score, box in sppnet's convention).
``run_on_images`` does the same on arbitrary image files, computing proposals and conv5 maps on the fly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .core import boxes as B
from .core import fcfeatures
from .core.artifacts import Run, StageResult, atomic_write_bytes
from .core.bboxreg import BboxModel, apply_bbox, load_bbox_model
from .core.errors import SppError
from .core.nets import BACKGROUND, resolve_device
from .core.proposals import load_proposals, selective_search
from .core.svm import SvmModel, load_svm_model
from .core.registry import bbox_tag, command_for_path, detect_tag, svm_tag
from .core.runner import Produced, StagePlan, execute
from .core.voc import load_image_rgb, write_comp4


@dataclass(frozen=True)
class ClassModels:
    """What scoring needs: the class SVMs (None: the fine-tuned fc8 softmax scores) and, optionally, the box
    regressors."""

    svm: SvmModel | None
    bbox: BboxModel | None
    softmax_classes: tuple[str, ...] = ()  # without SVMs: the object classes of fc8 (background dropped)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.svm.classes if self.svm is not None else self.softmax_classes


def detect_windows(boxes: np.ndarray, scores: np.ndarray, image_wh: tuple[int, int], *, score_thresh: float,
                   nms_iou: float, max_per_image: int, regress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class: keep scores > thresh, greedy NMS (IoU > nms_iou suppressed), top ``max_per_image``; then, with
    ``regress(class_index, rows) -> boxes`` (rows index ``boxes``), move the survivors, clip them to the image and
    run NMS again (SPEC §6-7: the released code's evaluation applies NMS 0.3 after regression)."""
    out = []
    for k in range(scores.shape[1]):
        rows = np.flatnonzero(scores[:, k] > score_thresh)
        rows = rows[B.nms(boxes[rows], scores[rows, k], nms_iou)[:max_per_image]]
        cls_boxes, cls_scores = boxes[rows], scores[rows, k]
        if regress is not None and len(rows):
            cls_boxes = B.clip_boxes(regress(k, rows), *image_wh)
            keep = B.nms(cls_boxes, cls_scores, nms_iou)
            cls_boxes, cls_scores = cls_boxes[keep], cls_scores[keep]
        out.append((cls_boxes, cls_scores))
    return out


class _Scorer:
    """Window features -> SVM scores (and box regression) for one variant, on one device."""

    def __init__(self, cfg, run: Run, feature: str, one_scale: bool, use_bbox: bool, device: torch.device):
        n_scales = len(cfg.features.scales)
        self.cfg, self.feature, self.one_scale, self.device = cfg, feature, one_scale, device
        self.softmax = feature == "softmax"  # fc8's class probabilities instead of SVM scores
        self.svm_manifest = None if self.softmax else run.require("svm", svm_tag(feature, one_scale, n_scales))
        # Box regressors read pool5 from the same conv layers as the feature (train-bbox --conv-from).
        self.conv_from = fcfeatures.conv_source(run, feature)
        self.bbox_manifest = run.require("bbox", bbox_tag(one_scale, n_scales, self.conv_from)) if use_bbox else None
        bbox = load_bbox_model(self.bbox_manifest.output("bbox")) if self.bbox_manifest else None
        self.nets, self.net_manifests = fcfeatures.load_feature_nets(run, feature, cfg, device=device)
        if self.softmax:
            names = tuple(self.nets["finetuned"].class_names)
            if not names or names[0] != BACKGROUND:
                model_path = self.net_manifests["finetune"].output("model")
                raise SppError("the fine-tuned model has no background-first class list for softmax scores; rerun "
                               f"`{command_for_path(model_path)}`", model_path)
            self.models = ClassModels(None, bbox, names[1:])
        else:
            self.models = ClassModels(load_svm_model(self.svm_manifest.output("svm")), bbox)
        # fc6/fc7 weight type (bfloat16 moves scores by ~1e-2 of their range, BENCHMARKS.md). The nets are fresh
        # copies loaded for this stage, so converting them in place is safe.
        for net in self.nets.values():
            net.head.to(getattr(torch, cfg.detect.fc_dtype))
        self.scales_subset = (cfg.features.one_scale,) if one_scale else None
        self._fc = fcfeatures

    def score(self, cache, image_id: str, boxes: np.ndarray, image_wh: tuple[int, int]):
        """Per-class (boxes, scores) of one image's windows; conv5 maps are read and pooled once."""
        fc, cfg = self._fc, self.cfg
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return [(np.zeros((0, 4)), np.zeros(0)) for _ in self.models.classes]
        maps = fc.load_maps(cache, image_id, self.scales_subset, device=self.device)
        # Pool and score each distinct (scale, conv5 rectangle) once; every window then takes its twin's row.
        distinct = fc.distinct_windows(maps, boxes, rule=cfg.features.scale_rule)
        pooled = fc.pool_windows(maps, boxes[distinct.rows], fc.feature_pyramid(self.nets, cfg.model.pyramid),
                                 scale_index=distinct.scale_index, rule=cfg.features.scale_rule)
        feats = fc.head_features(pooled, self.feature, self.nets, cfg.detect.batch_windows)
        if self.softmax:
            distinct_scores = feats[:, 1:].float()  # column 0 is the background
        else:
            distinct_scores = self.models.svm.scores(feats)  # on the features' device
        scores = distinct_scores[torch.as_tensor(distinct.inverse, device=distinct_scores.device)]
        regress = None
        if self.models.bbox is not None:
            def regress(k: int, rows: np.ndarray) -> np.ndarray:
                own = torch.as_tensor(distinct.inverse[rows], device=pooled.device)
                return apply_bbox(self.models.bbox, k, pooled[own], boxes[rows], image_wh)
        d = cfg.detect
        return detect_windows(boxes, scores.double().cpu().numpy(), image_wh, score_thresh=d.score_thresh,
                              nms_iou=d.nms_iou, max_per_image=d.max_per_image, regress=regress)


def run(cfg, split: str, feature: str = "ftfc7", one_scale: bool = False) -> StageResult:
    from .core.features import cache_of

    run_dir = Run(cfg.run_dir)
    device = resolve_device(cfg.device)
    n_scales = len(cfg.features.scales)
    use_bbox = bool(cfg.detect.bbox)
    tag = detect_tag(split, feature, one_scale, n_scales, use_bbox)
    scorer = _Scorer(cfg, run_dir, feature, one_scale, use_bbox, device)
    proposals_manifest = run_dir.require("proposals", split)
    features_manifest = fcfeatures.features_manifest(run_dir, split, feature)
    inputs = {"proposals": proposals_manifest, "features": features_manifest, **scorer.net_manifests}
    if scorer.svm_manifest is not None:
        inputs["svm"] = scorer.svm_manifest
    if scorer.bbox_manifest is not None:
        inputs["bbox"] = scorer.bbox_manifest
    config = {"detect": cfg.section("detect"), "features": cfg.section("features"), "feature": feature,
              "one_scale": one_scale, "split": split}
    plan = StagePlan("detect", tag, config, inputs, {"comp4_dir": "comp4", "detections": "detections.npz"})

    def detect(out_dir: Path) -> Produced:
        proposals = load_proposals(run_dir, split)
        cache = cache_of(features_manifest)
        classes = scorer.models.classes
        per_class: list[list] = [[] for _ in classes]
        rows = []
        image_ids = proposals.image_ids
        start = time.perf_counter()
        with torch.inference_mode():
            for image_index, image_id in enumerate(tqdm(image_ids, desc=f"detect {tag}", unit="img", leave=False)):
                height, width = cache.image_hw(image_id)
                dets = scorer.score(cache, image_id, proposals.boxes(image_id), (width, height))
                for k, (kept_boxes, kept_scores) in enumerate(dets):
                    for box, score in zip(kept_boxes, kept_scores):
                        per_class[k].append((image_id, float(score), box))
                        rows.append((image_index, k, float(score), *box))
        for k, name in enumerate(classes):
            write_comp4(out_dir / "comp4", split, name, per_class[k])
        table = np.array(rows, dtype=np.float64).reshape(-1, 7)
        _save_npz(out_dir / "detections.npz", image_ids=np.array(image_ids), classes=np.array(classes),
                  image_index=table[:, 0].astype(np.int64), label=table[:, 1].astype(np.int64), score=table[:, 2],
                  boxes=table[:, 3:7])
        seconds = time.perf_counter() - start
        return Produced({"images": len(image_ids), "detections": int(len(table)), "seconds": seconds,
                         "images_per_s": len(image_ids) / max(seconds, 1e-9), "device": str(device)})

    def describe(m: dict) -> str:
        return (f"detect {tag}: {m['detections']} detections on {m['images']} images ({m['images_per_s']:.2f} "
                f"img/s, {m['device']}) -> {run_dir.stage_dir('detect', tag) / 'comp4'}")

    return execute(run_dir, plan, detect, describe=describe, cfg=cfg)


def _save_npz(path: Path, **arrays) -> None:
    import io
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


class LiveMaps:
    """The slice of FeatureCache's reading API that scoring uses, over conv5 maps computed on the fly for one
    image (``spp detect --images``)."""

    paths: list = []

    def __init__(self, backbone, scales: tuple[int, ...], image: np.ndarray, device: torch.device):
        from .core import nets

        self.spec, self.scales = backbone.spec, tuple(scales)
        self.height, self.width = image.shape[:2]
        with torch.inference_mode():
            self._maps = [backbone(nets.preprocess(image, s, self.spec)[None].to(device))[0].float()
                          for s in self.scales]

    def image_hw(self, image_id: str) -> tuple[int, int]:
        return self.height, self.width

    def maps(self, image_id: str, flip: bool = False, device="cpu", scales_subset=None) -> list[torch.Tensor]:
        if flip:
            raise SppError("live conv5 maps have no flipped copy")
        scales = self.scales if scales_subset is None else tuple(scales_subset)
        return [self._maps[self.scales.index(s)].to(device) for s in scales]


def run_on_images(cfg, images: list[Path], out: Path, feature: str = "ftfc7", one_scale: bool = False) -> StageResult:
    """Detect on arbitrary image files with the run's trained models; save each image with its boxes drawn."""
    import cv2

    from .core import nets

    run_dir = Run(cfg.run_dir)
    device = resolve_device(cfg.device)
    scorer = _Scorer(cfg, run_dir, feature, one_scale, bool(cfg.detect.bbox), device)
    # The conv layers come from the stage the source is named after (CONV_SOURCES are stage names).
    model, _ = nets.load_checkpoint(run_dir.require(scorer.conv_from).output("model"),
                                    expect_backbone=cfg.model.backbone)
    backbone = model.backbone.to(device).eval()
    scales = (cfg.features.one_scale,) if one_scale else tuple(cfg.features.scales)
    out.mkdir(parents=True, exist_ok=True)
    lines, drawn = [], 0
    for path in images:
        image = load_image_rgb(path)
        height, width = image.shape[:2]
        boxes = selective_search(image, cfg.proposals)
        live = LiveMaps(backbone, scales, image, device)
        with torch.inference_mode():
            dets = scorer.score(live, path.stem, boxes, (width, height))
        canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        for k, (kept_boxes, kept_scores) in enumerate(dets):
            for box, score in zip(kept_boxes, kept_scores):
                if score < 0:  # draw confident detections only; the SVM margin is 0
                    continue
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                colour = tuple(int(c) for c in np.random.default_rng(k).integers(64, 256, 3))
                cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, 2)
                cv2.putText(canvas, f"{scorer.models.classes[k]} {score:.2f}", (x1, max(y1 - 3, 10)),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
                lines.append(f"{path.name} {scorer.models.classes[k]} {score:.3f} "
                             f"{x1} {y1} {x2} {y2}")
                drawn += 1
        target = out / f"{path.stem}_detections.jpg"
        ok, encoded = cv2.imencode(".jpg", canvas)
        if not ok:
            raise SppError("could not encode the output image", target)
        atomic_write_bytes(target, encoded.tobytes())
    atomic_write_bytes(out / "detections.txt", "".join(f"{line}\n" for line in lines).encode())
    return StageResult(None, summary=(
        f"{drawn} detections with score >= 0 on {len(images)} image(s) -> {out}"))
