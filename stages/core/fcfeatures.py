"""Window features for train-svm, train-bbox and detect: pooled conv5 ("pool5") or the fc6/fc7 activations of the
pretrained or fine-tuned head, computed from the conv5 cache at the best scale per window (SPEC §2, §5).

One image at a time: its conv5 maps are read once, every window gets its scale and conv5 cell rectangle
(``window_cells``, also the key of the released code's negative de-duplication), is SPP-pooled
(``spp.pool_windows``) and, for fc features, pushed through the head in batches in inference mode.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import fccompress, quant, spp
from .artifacts import Manifest, Run
from .errors import SppError
from .registry import command_for_path
from .nets import load_checkpoint, resolve_device
from .quant import QuantizedRows

if TYPE_CHECKING:  # only their public reading APIs are used here
    from .features import FeatureCache
    from .voc import VocDataset

# feature name -> (which net, which head layer); pool5 needs no net.
FEATURE_SOURCES: dict[str, tuple[str, str] | None] = {
    "pool5": None,
    "fc6": ("pretrained", "fc6"),
    "fc7": ("pretrained", "fc7"),
    "ftfc6": ("finetuned", "fc6"),
    "ftfc7": ("finetuned", "fc7"),
    "softmax": ("finetuned", "softmax"),  # fc8's class probabilities, background first: detect scores with them
}
NET_STAGES = {"pretrained": "pretrain", "finetuned": "finetune"}
DEFAULT_PYRAMID = spp.DEFAULT_PYRAMID  # SPEC §1; used for pool5 when neither the caller nor a net says otherwise
FEATURE_STATS_SEED = 3  # the released code's seed_rand() for the mean-norm statistic [S:spp_feature_stats.m]


def _check_feature(feature: str) -> tuple[str, str] | None:
    if feature not in FEATURE_SOURCES:
        raise SppError(f"unknown feature {feature!r} (known: {', '.join(FEATURE_SOURCES)})")
    return FEATURE_SOURCES[feature]


def required_nets(feature: str) -> tuple[str, ...]:
    """Which nets ("pretrained", "finetuned") a feature needs: none for pool5."""
    source = _check_feature(feature)
    return () if source is None else (source[0],)


def feature_net_inputs(run: Run, feature: str) -> dict[str, Manifest]:
    """The upstream manifests (pretrain and/or finetune) a feature depends on, checked fresh."""
    return {NET_STAGES[kind]: run.require(NET_STAGES[kind]) for kind in required_nets(feature)}


def conv_source(run: Run, feature: str) -> str:
    """Whose conv layers the conv5 maps of ``feature`` must come from: "finetune" for ftfc6/ftfc7 of a model
    fine-tuned with --conv (its fc layers were trained on its own conv5), else "pretrain"."""
    if required_nets(feature) == ("finetuned",) and run.require("finetune").metrics.get("conv"):
        return "finetune"
    return "pretrain"


def features_manifest(run: Run, split: str, feature: str) -> Manifest:
    """The extract-features manifest of the conv5 cache ``feature`` is computed from (see ``conv_source``); open
    it with ``features.cache_of`` once the stage knows it has work to do."""
    from .features import features_tag

    return run.require("features", features_tag(split, conv_source(run, feature)))


def load_feature_nets(run: Run, feature: str, cfg, device: torch.device | str | None = None,
                      expect_backbone: str | None = None) -> tuple[dict, dict[str, Manifest]]:
    """The nets a feature needs, in eval mode on ``device`` (default ``cfg.device``), and their manifests; their
    heads' fc6/fc7 compressed as ``detect.fc_compression`` says (``fccompress``: train-svm and detect both load
    their nets here, so SVMs and detections see the same fc layers).

    Returns ``({"pretrained": SppNet} or {"finetuned": SppNet} or {}, {"pretrain"|"finetune": Manifest})``.
    """
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    manifests = feature_net_inputs(run, feature)
    nets = {}
    for kind in required_nets(feature):
        manifest = manifests[NET_STAGES[kind]]
        net, meta = load_checkpoint(manifest.output("model"), expect_backbone=expect_backbone or cfg.model.backbone,
                                    random_init=False)  # every weight comes from the file
        if bool(meta.get("conv_finetuned")) != bool(manifest.metrics.get("conv")):  # the file vs its manifest
            raise SppError("the model file does not match its manifest (fine-tuned with --conv or not); rerun "
                           "`spp finetune`", manifest.output("model"))
        net = net.to(device).eval()
        net.head = fccompress.configured_head(net.head, cfg.detect)
        nets[kind] = net
    return nets, manifests


def scales_for(cache: FeatureCache, scales: Sequence[int]) -> tuple[int, ...]:
    """Check that the cache holds every requested scale; one-line error naming the cache otherwise."""
    missing = [s for s in scales if s not in tuple(cache.scales)]
    if missing or not scales:
        raise SppError(f"the conv5 cache holds scales {list(cache.scales)}, not {list(missing or scales)}; rerun "
                       f"`spp extract-features` with these scales", cache.paths[0])
    return tuple(int(s) for s in scales)


def training_images(dataset: VocDataset, split: str, cache: FeatureCache) -> list[str]:
    """The split's usable images, all of which must be in the conv5 cache (train-svm and train-bbox train on them)."""
    image_ids = dataset.usable_ids(split)
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise SppError(f"the conv5 cache lacks {len(missing)} image(s) of split {split!r} (e.g. {missing[0]!r}); "
                       f"rerun `{command_for_path(cache.paths[0])}`", cache.paths[0])
    if not image_ids:
        raise SppError(f"split {split!r} has no usable images", dataset.split_path(split))
    return image_ids


@dataclass
class ImageMaps:
    """One image's conv5 maps at the scales in use (a subset of the cache's, in the order given)."""

    image_id: str
    image_hw: tuple[int, int]
    scales: tuple[int, ...]
    maps: list[torch.Tensor]  # [C, h, w] per scale
    spec: object  # nets.BackboneSpec


def load_maps(cache: FeatureCache, image_id: str, scales_subset: Sequence[int] | None = None,
              device: torch.device | str = "cpu", flip: bool = False) -> ImageMaps:
    """Read one image's conv5 maps once; ``scales_subset`` (e.g. ``(688,)`` for 1-scale) picks the scales used;
    ``flip``: the mirrored image's maps (its windows are ``boxes.flip_boxes`` of the image's)."""
    all_scales = tuple(int(s) for s in cache.scales)
    scales = all_scales if scales_subset is None else scales_for(cache, scales_subset)
    chosen = cache.maps(image_id, flip=flip, device=device, scales_subset=scales)  # only the scales in use
    return ImageMaps(image_id, tuple(int(v) for v in cache.image_hw(image_id)), scales, chosen, cache.spec)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def window_cells(maps: ImageMaps, boxes: np.ndarray, rule: str = "code") -> tuple[np.ndarray, np.ndarray]:
    """Each window's best scale (index into ``maps.scales``) and its 0-based inclusive conv5 cell rectangle
    (x0, y0, x1, y1) on that scale's map (SPEC §2 steps 1-4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64)
    scale_index = _as_numpy(spp.choose_scale(boxes, maps.image_hw, maps.scales, rule=rule)).astype(np.int64)
    cells = np.zeros((len(boxes), 4), dtype=np.int64)
    for k, scale in enumerate(maps.scales):
        sel = np.flatnonzero(scale_index == k)
        if len(sel):
            scaled = spp.scale_boxes(boxes[sel], maps.image_hw, scale)
            fmap_hw = tuple(maps.maps[k].shape[-2:])
            cells[sel] = _as_numpy(spp.boxes_to_cells(scaled, fmap_hw, maps.spec)).astype(np.int64)
    return scale_index, cells


@dataclass(frozen=True)
class DistinctWindows:
    """Windows that pool identical features, collapsed: ``rows`` picks one window per distinct (scale, conv5 cell
    rectangle), ``scale_index`` is the chosen scale of each picked window, and ``inverse`` maps every input window
    to its position in ``rows`` (``per_window = per_distinct[inverse]``)."""

    rows: np.ndarray  # int64 [U]
    scale_index: np.ndarray  # int64 [U]
    inverse: np.ndarray  # int64 [N]


def distinct_windows(maps: ImageMaps, boxes: np.ndarray, rule: str = "code") -> DistinctWindows:
    """Collapse windows on the same (best scale, conv5 cell rectangle): SPP pooling reads only that rectangle, so
    their pooled features, fc activations and scores are identical, and computing them once is exact (on VOC07
    selective-search proposals at 688 px about one window in five is such a repeat)."""
    scale_index, cells = window_cells(maps, boxes, rule)
    rows, inverse = spp.distinct_cells(scale_index, cells)
    return DistinctWindows(rows, scale_index[rows], inverse)


def pool_windows(maps: ImageMaps, boxes: np.ndarray, pyramid: Sequence[int], scale_index: np.ndarray | None = None,
                 rule: str = "code", quantized: bool = False) -> torch.Tensor | QuantizedRows:
    """SPP-pooled conv5 features [N, C*bins] float32 on the maps' device (best scale unless ``scale_index``);
    ``quantized``: as uint8 ``QuantizedRows`` quantized as ``quantized_rows`` does, pooled straight into uint8
    (the input of an int8 head, ``takes_quantized_rows``)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pooled = spp.pool_windows(maps.maps, maps.image_hw, maps.scales, boxes, maps.spec, tuple(pyramid),
                              scale_index=scale_index, rule=rule, quantized=quantized)
    return pooled if quantized else pooled.float()


def quantized_rows(maps: ImageMaps, pooled: torch.Tensor) -> QuantizedRows:
    """Float rows pooled from ``maps`` as uint8 ``QuantizedRows`` (the net's column order) with the scale and zero
    point of the maps' range: the values ``pool_windows(..., quantized=True)`` pools (quantization commutes with
    max-pooling), so an int8 head's fc6 sees the same input whichever way the rows were pooled."""
    scale, zero_point = quant.tensors_qparams(maps.maps)
    return quant.QuantizedRows(quant.quantize_values(pooled, scale, zero_point), scale, zero_point)


def takes_quantized_rows(feature: str, nets_by_kind: dict) -> bool:
    """Whether ``feature`` is computed by a head that takes uint8 rows (``fccompress.Int8SppHead``), which SPP then
    pools straight into uint8 (``pool_windows(..., quantized=True)``)."""
    source = _check_feature(feature)
    return source is not None and source[0] in nets_by_kind and \
        nets_by_kind[source[0]].head.input_dtype == torch.uint8


def head_features(pooled: torch.Tensor | QuantizedRows, feature: str, nets_by_kind: dict, batch: int = 4096) -> torch.Tensor:
    """pool5 -> itself; fc6/fc7 -> the pretrained head's post-ReLU activations; ftfc6/ftfc7 -> the fine-tuned
    head's. Batched, inference mode (no dropout), on the pooled tensor's device."""
    source = _check_feature(feature)
    if source is None:
        return pooled.dequantize() if isinstance(pooled, QuantizedRows) else pooled
    kind, layer = source
    if kind not in nets_by_kind:
        raise SppError(f"feature {feature!r} needs the {kind} network (run `spp {NET_STAGES[kind]}` first)")
    head = nets_by_kind[kind].head
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            return head_rows(head, pooled, layer, batch)
    finally:
        head.train(was_training)


# A bfloat16 GEMM on the CPU runs a oneDNN kernel built for its shape on first use and cached by it: with a new
# row count for every image, each image paid for a build (tens of ms at fc6's shape). Batches are padded to a
# multiple of this many rows, so that a handful of shapes serve every image.
BFLOAT16_ROW_MULTIPLE = 128
_PADDING_ROWS = contextvars.ContextVar("padding_rows", default=0)


def padding_rows() -> int:
    """How many of the rows in the batch ``head_rows`` is running now are its zero padding (0 outside it): FLOP
    counters (spp bench) leave them out, so that a rate is the windows' work, not the padding's."""
    return _PADDING_ROWS.get()


def row_multiple(head, device: torch.device | str) -> int:
    """The multiple ``head_rows`` pads a batch's rows to: ``BFLOAT16_ROW_MULTIPLE`` for a bfloat16 head on the
    CPU, else 1 (float32 GEMMs build nothing per shape; int8 layers quantize per batch, padding or not)."""
    return BFLOAT16_ROW_MULTIPLE if head.input_dtype == torch.bfloat16 and torch.device(device).type == "cpu" else 1


def _padded_batch(rows: torch.Tensor, dtype: torch.dtype, multiple: int) -> torch.Tensor:
    """``rows`` in ``dtype``, with zero rows after them up to a multiple of ``multiple`` (converted in the copy:
    no extra pass over the rows). A row's features do not depend on the rows beside it."""
    count = len(rows)
    padded = -(-count // multiple) * multiple
    if padded == count:
        return rows.to(dtype)
    batch = torch.empty((padded, *rows.shape[1:]), dtype=dtype, device=rows.device)
    batch[:count] = rows
    batch[count:] = 0
    return batch


def head_rows(head, pooled: torch.Tensor, layer: str = "fc7", batch: int = 4096) -> torch.Tensor:
    """``head.features(.., layer)`` of pooled rows, ``batch`` rows at a time, each batch converted to the type fc6
    takes (bfloat16 for a bfloat16 head, detect.fc_dtype) and padded as ``row_multiple`` says, float32 out: the fc
    path of train-svm and detect, and of every mode of spp bench, so that it times this very code. Call in
    inference mode, the head in eval mode."""
    step = max(1, int(batch))
    dtype, multiple = head.input_dtype, row_multiple(head, pooled.device)
    if isinstance(pooled, QuantizedRows) and dtype != torch.uint8:  # uint8 rows for a float head
        pooled = pooled.dequantize()
    parts = []
    for start in range(0, len(pooled), step):
        rows = pooled[start:start + step]
        # An int8 head takes uint8 rows as they are, and quantizes float ones per batch itself.
        batch = rows if dtype == torch.uint8 else _padded_batch(rows, dtype, multiple)
        token = _PADDING_ROWS.set(len(batch) - len(rows))
        try:
            parts.append(head.features(batch, layer)[:len(rows)])
        finally:
            _PADDING_ROWS.reset(token)
    if not parts:
        width = {"pool5": head.in_features, "softmax": head.fc8.out_features}.get(layer)
        width = width if width is not None else getattr(head, layer).out_features
        return torch.zeros((0, width), dtype=torch.float32, device=pooled.device)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).float()  # one batch: no concatenation copy


def feature_pyramid(nets_by_kind: dict, pyramid: Sequence[int] | None = None) -> tuple[int, ...]:
    """The SPP pyramid: the one given, else the nets' (which must agree), else SPEC's (1, 2, 3, 6)."""
    net_pyramids = {tuple(int(n) for n in net.pyramid) for net in nets_by_kind.values()}
    if pyramid is not None:
        pyramid = tuple(int(n) for n in pyramid)
        if net_pyramids and net_pyramids != {pyramid}:
            raise SppError(f"SPP pyramid {pyramid} does not match the network's {sorted(net_pyramids)[0]}")
        return pyramid
    if len(net_pyramids) > 1:
        raise SppError(f"the networks use different SPP pyramids {sorted(net_pyramids)}")
    return net_pyramids.pop() if net_pyramids else DEFAULT_PYRAMID


def window_features(cache: FeatureCache, image_id: str, boxes: np.ndarray, feature: str, nets_by_kind: dict,
                    one_scale_subset: Sequence[int] | None = None, device: torch.device | str = "cpu",
                    batch: int = 4096, *, cfg=None, scales_subset: Sequence[int] | None = None,
                    pyramid: Sequence[int] | None = None, rule: str | None = None) -> torch.Tensor:
    """Features [N, D] float32 (on ``device``) of one image's windows (original-image boxes), each at its best
    scale among ``one_scale_subset`` (alias ``scales_subset``; None: every cached scale).
    ``feature``: pool5 | fc6 | fc7 | ftfc6 | ftfc7. The SPP pyramid and the scale rule come from ``pyramid`` /
    ``rule``, else from ``cfg`` (``model.pyramid``, ``features.scale_rule``), else the nets / SPEC defaults."""
    if scales_subset is not None and one_scale_subset is not None and tuple(scales_subset) != tuple(one_scale_subset):
        raise ValueError("give the scale subset once (one_scale_subset or scales_subset)")
    subset = one_scale_subset if one_scale_subset is not None else scales_subset
    if cfg is not None:
        pyramid = cfg.model.pyramid if pyramid is None else pyramid
        rule = cfg.features.scale_rule if rule is None else rule
    maps = load_maps(cache, image_id, subset, device=device)
    pooled = pool_windows(maps, boxes, feature_pyramid(nets_by_kind, pyramid), rule=rule or "code",
                          quantized=takes_quantized_rows(feature, nets_by_kind))
    return head_features(pooled, feature, nets_by_kind, batch)


def feature_scale(cache: FeatureCache, rows_for: Callable[[str], np.ndarray], image_ids: Sequence[str], feature: str,
                  nets_by_kind: dict, one_scale_subset: Sequence[int] | None = None,
                  device: torch.device | str = "cpu", batch: int = 4096, *, pyramid: Sequence[int] | None = None,
                  rule: str = "code", target_norm: float = 20.0, seed: int = FEATURE_STATS_SEED,
                  max_images: int = 200, max_boxes: int = 200) -> tuple[float, float]:
    """``(target_norm / mean_norm, mean_norm)``: the mean L2 norm of the features of <= ``max_boxes`` random
    windows (``rows_for(image_id)``: every roidb row, GT included) in each of <= ``max_images`` random images,
    seeded [SPEC §5; S:spp_feature_stats.m]. Every feature is multiplied by the factor before use."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(image_ids), size=min(len(image_ids), max_images), replace=False)
    norms = []
    for position in chosen:
        image_id = image_ids[int(position)]
        rows = np.asarray(rows_for(image_id), dtype=np.float64).reshape(-1, 4)
        if len(rows) == 0:
            continue
        picked = rows[rng.choice(len(rows), size=min(len(rows), max_boxes), replace=False)]
        feats = window_features(cache, image_id, picked, feature, nets_by_kind, one_scale_subset, device, batch,
                                pyramid=pyramid, rule=rule)
        norms.append(torch.linalg.vector_norm(feats.double(), dim=1).cpu().numpy())
    if not norms:
        raise SppError("no windows to compute the feature norm from (empty training split?)")
    mean_norm = float(np.concatenate(norms).mean())
    if not np.isfinite(mean_norm) or mean_norm <= 0:
        raise SppError(f"the mean {feature} feature norm is {mean_norm}; the features are all zero or invalid")
    return target_norm / mean_norm, mean_norm
