"""A run's trained detector applied to one image's windows: class SVM scores (or the fine-tuned fc8's softmax),
per-class NMS, optional box regression (SPEC §6-7).

Shared by ``spp detect`` (windows and conv5 maps from the run's proposals and feature cache) and
``stages.detector`` (any image: selective search and conv5 maps computed on the fly, ``LiveMaps``), so that both
score a window in exactly one way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import boxes as B
from . import fcfeatures
from .artifacts import CONV_LAYERS_PART, Run
from .bboxreg import BboxModel, apply_bbox, load_bbox_model
from .errors import SppError
from .nets import BACKGROUND, Backbone, conv5_maps, load_checkpoint, preprocess
from .registry import bbox_tag, command_for_path, svm_tag
from .svm import SvmModel, load_svm_model
from .timing import PhaseTimer, no_timer


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
                   nms_iou: float, max_per_image: int, regress=None,
                   timer: PhaseTimer | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class: keep scores > thresh, greedy NMS (IoU > nms_iou suppressed), top ``max_per_image``; then, with
    ``regress(rows_per_class) -> boxes_per_class`` (rows index ``boxes``; every class at once, so that their
    features are gathered once), move the survivors, clip them to the image and run NMS again (SPEC §6-7: the
    released code's evaluation applies NMS 0.3 after regression). ``timer`` (a ``PhaseTimer``) counts the
    phases "nms" and "bbox"."""
    phase = timer or no_timer
    with phase("nms"):
        kept = []
        for k in range(scores.shape[1]):
            rows = np.flatnonzero(scores[:, k] > score_thresh)
            kept.append(rows[B.nms_top(boxes[rows], scores[rows, k], nms_iou, max_per_image)])
    if regress is None:
        return [(boxes[rows], scores[rows, k]) for k, rows in enumerate(kept)]
    with phase("bbox"):
        moved = [B.clip_boxes(regressed, *image_wh) for regressed in regress(kept)]
    out = []
    with phase("nms"):
        for k, rows in enumerate(kept):
            cls_boxes, cls_scores = moved[k], scores[rows, k]
            if len(rows):
                keep = B.nms(cls_boxes, cls_scores, nms_iou)
                cls_boxes, cls_scores = cls_boxes[keep], cls_scores[keep]
            out.append((cls_boxes, cls_scores))
    return out


class Scorer:
    """Window features -> SVM scores (or fc8 softmax probabilities) and box regression for one variant of a run
    (``feature``, ``one_scale``, ``use_bbox``), on one device. Reads the run's trained models; writes nothing."""

    def __init__(self, cfg, run: Run, feature: str, one_scale: bool, use_bbox: bool, device: torch.device):
        n_scales = len(cfg.features.scales)
        self.cfg, self.run, self.feature, self.one_scale, self.device = cfg, run, feature, one_scale, device
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
        # fc6/fc7 weight type (bfloat16 moves scores by ~1e-2 of their range, docs/BENCHMARKS.md); the heads are
        # already compressed as detect.fc_compression says (load_feature_nets). The nets are fresh copies loaded
        # for this scorer, so converting them in place is safe (an int8 head stays float32: the config refuses
        # int8 with bfloat16).
        for net in self.nets.values():
            net.head.to(getattr(torch, cfg.detect.fc_dtype))
        self.scales = (cfg.features.one_scale,) if one_scale else tuple(cfg.features.scales)
        self.scales_subset = (cfg.features.one_scale,) if one_scale else None

    def conv_backbone(self) -> Backbone:
        """The conv layers whose conv5 maps this variant was trained on (``conv_from``'s model), in eval mode on
        the scorer's device: what ``LiveMaps`` runs on an image that has no conv5 cache."""
        kind = {"pretrain": "pretrained", "finetune": "finetuned"}[self.conv_from]
        if kind in self.nets:  # already loaded for the features (ftfc6/ftfc7 of a model fine-tuned with --conv)
            return self.nets[kind].backbone.eval()
        manifest = self.run.require(self.conv_from)
        conv_digest = manifest.metrics.get(CONV_LAYERS_PART)
        for stage, net in ((fcfeatures.NET_STAGES[k], n) for k, n in self.nets.items()):
            # A loaded net with the very same conv layers (fine-tuned without --conv): no second checkpoint read.
            if conv_digest and self.net_manifests[stage].metrics.get(CONV_LAYERS_PART) == conv_digest:
                return net.backbone.eval()
        model, _ = load_checkpoint(manifest.output("model"), expect_backbone=self.cfg.model.backbone,
                                   random_init=False)
        return model.backbone.to(self.device).eval()

    def score(self, cache, image_id: str, boxes: np.ndarray, image_wh: tuple[int, int],
              score_thresh: float | None = None,
              timer: PhaseTimer | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-class (boxes, scores) of one image's windows; conv5 maps are read and pooled once (and the mirrored
        image's once more with ``detect.test_flip``). ``cache`` is a ``FeatureCache`` or ``LiveMaps``;
        ``score_thresh`` defaults to ``detect.score_thresh``. ``timer`` (a ``PhaseTimer``) counts the phases
        "read", "pool", "fc", "score", "nms" and "bbox"."""
        cfg = self.cfg
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return [(np.zeros((0, 4)), np.zeros(0)) for _ in self.models.classes]
        scores, distinct, pooled = self._window_scores(cache, image_id, boxes, False, timer)
        if cfg.detect.test_flip:
            # The same windows on the mirrored image, their scores averaged with the image's own.
            mirrored, _, _ = self._window_scores(cache, image_id, B.flip_boxes(boxes, image_wh[0]), True, timer)
            scores = (scores + mirrored) / 2

        def regress(kept: list[np.ndarray]) -> list[np.ndarray]:
            # One gather and one device->host copy of the pool5 rows any class moves, not one per class.
            own = distinct.inverse[np.concatenate([np.zeros(0, dtype=np.int64), *kept])]
            needed, position = np.unique(own, return_inverse=True)
            features = pooled[torch.as_tensor(needed, device=pooled.device)].cpu().numpy()
            moved, start = [], 0
            with one_blas_thread():
                for k, rows in enumerate(kept):
                    at = position[start:start + len(rows)]
                    start += len(rows)
                    moved.append(apply_bbox(self.models.bbox, k, features[at], boxes[rows], image_wh) if len(rows)
                                 else boxes[rows])
            return moved
        d = cfg.detect
        return detect_windows(boxes, scores, image_wh,
                              score_thresh=d.score_thresh if score_thresh is None else float(score_thresh),
                              nms_iou=d.nms_iou, max_per_image=d.max_per_image,
                              regress=regress if self.models.bbox is not None else None, timer=timer)

    def _window_scores(self, cache, image_id: str, boxes: np.ndarray, flip: bool, timer: PhaseTimer | None
                       ) -> tuple[np.ndarray, fcfeatures.DistinctWindows, torch.Tensor]:
        """float64 [N, classes] scores of ``boxes`` on the image's maps (``flip``: the mirrored image's, ``boxes``
        already mirrored), with the distinct windows and their pool5 rows (what box regression reads)."""
        fc, cfg, phase = fcfeatures, self.cfg, timer or no_timer
        with phase("read"):
            maps = fc.load_maps(cache, image_id, self.scales_subset, device=self.device, flip=flip)
        with phase("pool"):
            # Pool and score each distinct (scale, conv5 rectangle) once; every window then takes its twin's row.
            distinct = fc.distinct_windows(maps, boxes, rule=cfg.features.scale_rule)
            # An int8 head takes uint8 rows, pooled straight into uint8, unless box regression needs the float
            # pool5 rows: then those, quantized after (the same uint8 rows either way).
            quantized = fc.takes_quantized_rows(self.feature, self.nets)
            regressing = self.models.bbox is not None and not flip  # the mirrored look's rows are not regressed
            pooled = fc.pool_windows(maps, boxes[distinct.rows], fc.feature_pyramid(self.nets, cfg.model.pyramid),
                                     scale_index=distinct.scale_index, rule=cfg.features.scale_rule,
                                     quantized=quantized and not regressing)
            fc_input = fc.quantized_rows(maps, pooled) if quantized and regressing else pooled
        if timer is not None:
            timer.count("windows", len(boxes))
            timer.count("fc_windows", len(distinct.rows))
        with phase("fc"):
            feats = fc.head_features(fc_input, self.feature, self.nets, cfg.detect.batch_windows)
        with phase("score"):
            if self.softmax:
                distinct_scores = feats[:, 1:].float()  # column 0 is the background
            else:
                distinct_scores = self.models.svm.scores(feats)  # on the features' device
            scores = distinct_scores[torch.as_tensor(distinct.inverse, device=distinct_scores.device)]
        return scores.double().cpu().numpy(), distinct, pooled


def one_blas_thread():
    """numpy's BLAS on one thread, within ``with``: box regression's products ([<=100, D] x [D, 4] per class) are too
    thin to share, and waking a second thread for each cost 5-10 ms on a busy machine (6x the product itself).
    BLAS threads split the rows, not the sums, so the results are the same to the bit (tests/test_detect_images.py)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


class LiveMaps:
    """The slice of FeatureCache's reading API that scoring uses, over conv5 maps computed on the fly for one
    image that is in no cache (``stages.detector``)."""

    paths: list = []

    def __init__(self, backbone: Backbone, scales: tuple[int, ...], image: np.ndarray, device: torch.device):
        self.spec, self.scales = backbone.spec, tuple(scales)
        self.height, self.width = image.shape[:2]
        self._backbone, self._image, self._device = backbone, image, device
        self._maps = {False: self._compute(image)}

    def _compute(self, image: np.ndarray) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [conv5_maps(self._backbone, preprocess(image, s, self.spec, device=self._device)[None])[0].float()
                    for s in self.scales]

    def image_hw(self, image_id: str) -> tuple[int, int]:
        return self.height, self.width

    def maps(self, image_id: str, flip: bool = False, device="cpu", scales_subset=None) -> list[torch.Tensor]:
        """The image's maps (``flip``: the mirrored image's, computed on first use)."""
        if flip not in self._maps:
            self._maps[flip] = self._compute(np.ascontiguousarray(self._image[:, ::-1]))
        scales = self.scales if scales_subset is None else tuple(scales_subset)
        return [self._maps[flip][self.scales.index(s)].to(device) for s in scales]
