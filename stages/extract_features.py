"""Stage ``extract-features``: conv5 maps of every image of a split at every scale, into the HDF5 cache.

Reads the pretrained checkpoint (``00_pretrain``; only its backbone is used) or, when no pretrain stage exists and
``model.weights`` is set, a torchvision trunk with those ImageNet weights. Writes ``02_features/<split>/``:
``features.h5`` (single process) or ``features.rank<r>.h5`` per torchrun rank, schema in ``core/features.py``.

Per image and scale: ``nets.preprocess`` (shorter side = scale, SPEC §3) -> backbone (``nets.conv5_maps``:
channels-last convolutions) -> float16 map [C,h,w].
Images whose resized sizes match are batched (up to ``features.batch_images``); others run one by one, because
zero padding to a common size would change the border cells. Flipped maps (the mirrored image through the
network) are stored for the training split when ``features.flip`` is on, as fine-tuning trains on flips (SPEC §3),
and for any other split when ``detect.test_flip`` is on (``stores_flip``).

Streaming and resumable: each image is written as soon as its maps exist and marked complete once flushed; a
killed run resumes from its ``.partial.h5`` file without recomputing finished images.

torchrun: rank r of W takes images ``r::W`` into ``features.rank<r>.h5``; rank 0 then polls until every other
shard is finished (with this very header) and writes the single manifest. Polling rather than a
``torch.distributed`` barrier: a resumed rank can finish hours before the others, past any barrier timeout.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import resource
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core import nets
from stages.core.artifacts import CONV_LAYERS_PART, Manifest, Run, StageResult, UsedPart, sha256_file
from stages.core.config import Config
from stages.core.errors import InputError, SppError
from stages.core.features import (SCHEMA_VERSION, FeatureWriter, feature_paths, features_tag, map_name, read_header,
                                  shard_file_name)
from stages.core.launch import process_shard, wait_for_files
from stages.core.logs import progress as progress_bar
from stages.core.runner import Produced, StagePlan, execute
from stages.core.voc import VocDataset

STAGE = "features"
log = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    index: int  # position in the split list
    image_id: str
    image_hw: tuple[int, int] | None  # None: unreadable and skipped (data.skip_bad)
    inputs: dict[tuple[bool, int], torch.Tensor]  # (flip, scale) -> preprocessed [3, h, w]
    error: str = ""


def select_device(name: str) -> torch.device:
    """``cfg.device`` (``auto`` -> CUDA when present); under torchrun, this rank's LOCAL_RANK GPU."""
    device = nets.resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def _conv_layers_of(manifest: Manifest) -> UsedPart:
    """The maps depend on the checkpoint's conv layers only: a new fc_dim, pyramid or class list (which rewrite
    the pretrain checkpoint) keeps them."""
    return UsedPart(manifest, CONV_LAYERS_PART)


def model_input(cfg: Config, run: Run, conv_from: str = "pretrain") -> tuple[UsedPart | dict, Path | str, bool]:
    """What the conv5 maps are computed with: (input record, weights/checkpoint path, is_checkpoint).

    The pretrain stage's checkpoint (recorded by its conv layers alone) when that stage exists (stale or missing ->
    one-line error naming the command);
    otherwise ``model.weights`` (a local file, fingerprinted by sha256, or torchvision's named weights).
    ``conv_from="finetune"``: the checkpoint of ``spp finetune --conv`` (its conv layers are its own)."""
    if conv_from == "finetune":
        manifest = run.require("finetune")
        if not manifest.metrics.get("conv"):
            raise SppError("this model was fine-tuned without --conv: its conv layers are the pretrained ones, "
                           "whose maps `spp extract-features` (without --conv-from) already stores",
                           manifest.output("model"))
        return _conv_layers_of(manifest), manifest.output("model"), True
    if run.manifest_path("pretrain").exists() or not cfg.model.weights:
        manifest = run.require("pretrain")
        return _conv_layers_of(manifest), manifest.output("model"), True
    weights = cfg.model.weights
    if Path(weights).is_file():
        return {"weights": str(weights), "sha256": sha256_file(Path(weights))}, Path(weights), False
    if any(sep in weights for sep in ("/", "\\")) or weights.endswith((".pt", ".pth")):
        raise SppError("model.weights file not found", weights)
    return {"weights": weights, "sha256": f"torchvision:{weights}"}, weights, False


def load_backbone(cfg: Config, source: Path | str, is_checkpoint: bool) -> nets.Backbone:
    if is_checkpoint:
        model, _meta = nets.load_checkpoint(Path(source), expect_backbone=cfg.model.backbone)
        return model.backbone
    return nets.build_backbone(cfg.model.backbone, str(source), cfg.model.width)


def stores_flip(cfg: Config, split: str, conv_from: str = "pretrain") -> bool:
    """Whether ``split``'s cache also holds the mirrored image's maps: the training split's serve fine-tuning on
    the cache (not a --conv model's own maps: SVMs and box regressors train on the images as they are); any other
    split's serve ``detect.test_flip``."""
    if split == cfg.data.train_split:
        return bool(cfg.features.flip and conv_from == "pretrain")
    return bool(cfg.detect.test_flip)


def run(cfg: Config, split: str, conv_from: str = "pretrain") -> StageResult:
    """conv5 maps of ``split`` into ``02_features/<split>/`` (``<split>+ftconv/`` with ``conv_from="finetune"``:
    the conv layers of a model fine-tuned with --conv)."""
    run_dir = Run(cfg.run_dir)
    rank, world_size = process_shard()
    dataset = VocDataset.from_config(cfg.data)
    image_ids = dataset.image_ids(split)
    scales = tuple(int(s) for s in cfg.features.scales)
    store_flip = stores_flip(cfg, split, conv_from)
    tag = features_tag(split, conv_from)
    model_record, model_source, is_checkpoint = model_input(cfg, run_dir, conv_from)
    dataset_fp = dataset.fingerprint(split)
    # Only what changes the file's contents (batching, one_scale and the scale rule do not).
    config_record = {"features": {"scales": list(scales), "flip": store_flip,
                                  "compression": cfg.features.compression},
                     "model": {"backbone": cfg.model.backbone}}
    if not is_checkpoint:
        config_record["model"]["weights"] = cfg.model.weights
    inputs = {"model": model_record, "dataset": dataset_fp}
    shard_names = [shard_file_name(r, world_size) for r in range(world_size)]
    outputs = ({"features": shard_names[0]} if world_size == 1
               else {f"features.rank{r}": name for r, name in enumerate(shard_names)})
    plan = StagePlan(STAGE, tag, config_record, inputs, outputs)

    def extract(folder: Path) -> Produced:
        checkpoint_sha = sha256_file(Path(model_source)) if is_checkpoint else model_record["sha256"]
        header = {"schema": SCHEMA_VERSION, "backbone": cfg.model.backbone, "checkpoint_sha256": checkpoint_sha,
                  "dataset_fingerprint": dataset_fp, "split": split, "scales": list(scales), "flip": store_flip,
                  "compression": int(cfg.features.compression), "rank": rank, "world_size": world_size}
        device = select_device(cfg.device)
        backbone = load_backbone(cfg, model_source, is_checkpoint).to(device).eval()
        writer = FeatureWriter(folder / shard_names[rank], header, backbone.spec, cfg.features.compression)
        mine = list(enumerate(image_ids))[rank::world_size]
        metrics = extract_shard(backbone, device, dataset, mine, writer, scales, store_flip,
                                max(1, cfg.features.batch_images), desc=f"features {tag}"
                                + (f" rank {rank}/{world_size}" if world_size > 1 else ""))
        if rank != 0:
            # Rank 0 writes the one manifest once every shard is finished; this rank's work is on disk.
            return Produced({}, summary=f"rank {rank}/{world_size}: {metrics['images']} images -> "
                            f"{writer.final} ({metrics['images_per_s']:.2f} img/s); rank 0 writes the manifest",
                            write_manifest=False)
        shard_paths = [folder / name for name in shard_names]
        if world_size > 1:
            wait_for_files(shard_paths, lambda p: _shard_ready(p, header),
                           on_wait=lambda pending: log.info("rank 0: waiting for %s",
                                                            ", ".join(p.name for p in pending)))
        shard_metrics = [metrics] + [_shard_metrics(p) for p in shard_paths[1:]]
        total = aggregate_metrics(shard_metrics, shard_paths)
        total["checkpoint_sha256"] = checkpoint_sha
        return Produced(total, extra={"computed_ids": metrics["computed_ids"]})

    def readable(manifest: Manifest) -> bool:  # a truncated cache of the right size is still not up to date
        return all(read_header(path) is not None for path in feature_paths(manifest))

    return execute(run_dir, plan, extract, describe=lambda metrics: _summary(tag, metrics), cfg=cfg,
                   verify=readable, lock_name=f".lock.rank{rank}" if rank else ".lock")  # rank 0 meets a plain run


def _shard_ready(path: Path, header: dict) -> bool:
    """A finished shard from this very configuration (an older shard with another header is not ready)."""
    found = read_header(path)
    if found is None:
        return False
    for key, value in header.items():
        if key == "rank":
            continue
        if found.get(key) != (list(value) if isinstance(value, tuple) else value):
            return False
    return True


def _shard_metrics(path: Path) -> dict:
    found = read_header(path) or {}
    return json.loads(found.get("metrics", "{}"))


def aggregate_metrics(per_shard: list[dict], paths: list[Path]) -> dict:
    """One manifest's metrics from the shards': sums, and the slowest shard's time (they run in parallel)."""
    images = sum(m["images"] for m in per_shard)
    computed = sum(m["images_computed"] for m in per_shard)
    seconds = max(m["seconds"] for m in per_shard)
    file_bytes = sum(p.stat().st_size for p in paths)
    out = {
        "images": images,
        "images_computed": computed,
        "images_resumed": sum(m["images_resumed"] for m in per_shard),
        "images_skipped": sum(m["images_skipped"] for m in per_shard),
        "seconds": round(seconds, 3),
        "images_per_s": round(computed / seconds, 4) if seconds > 0 else 0.0,
        "peak_rss_mb": max(m["peak_rss_mb"] for m in per_shard),
        "rss_before_images_mb": max((m.get("rss_before_images_mb") or 0) for m in per_shard),
        "file_bytes": file_bytes,
        "bytes_per_image": round(file_bytes / images) if images else 0,
        "shards": len(paths),
        "scales": per_shard[0]["scales"],
        "flip": per_shard[0]["flip"],
        "device": per_shard[0]["device"],
    }
    cuda_peaks = [m["peak_cuda_mb"] for m in per_shard if m.get("peak_cuda_mb") is not None]
    if cuda_peaks:
        out["peak_cuda_mb"] = max(cuda_peaks)
    return out


def _summary(split: str, metrics: dict) -> str:
    return (f"features {split}: {metrics.get('images')} images x {len(metrics.get('scales', []))} scales"
            f"{' (+flipped)' if metrics.get('flip') else ''}, {metrics.get('images_computed')} computed at "
            f"{metrics.get('images_per_s')} img/s, {metrics.get('bytes_per_image', 0) / 1e6:.2f} MB/image, "
            f"peak RSS {metrics.get('peak_rss_mb')} MB"
            + (f", peak CUDA {metrics['peak_cuda_mb']} MB" if metrics.get("peak_cuda_mb") is not None else ""))


# -- the extraction loop ------------------------------------------------------------------------------------------
class ConvRunner:
    """The backbone in inference mode, with a CUDA out-of-memory fallback: split the batch, then use the CPU
    for an image too large for the GPU (SPEC §3: Caffe ran very large images on the CPU too)."""

    def __init__(self, backbone: nets.Backbone, device: torch.device):
        self.backbone = backbone
        self.device = device
        self._cpu_backbone: nets.Backbone | None = None

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        try:
            return self._forward(self.backbone, batch, self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(batch) > 1:
                return np.concatenate([self(batch[k:k + 1]) for k in range(len(batch))])
            if self._cpu_backbone is None:
                self._cpu_backbone = copy.deepcopy(self.backbone).cpu()
            warnings.warn(f"image {tuple(batch.shape[-2:])} does not fit in GPU memory; running it on the CPU",
                          stacklevel=2)
            return self._forward(self._cpu_backbone, batch, torch.device("cpu"))

    @staticmethod
    def _forward(backbone: nets.Backbone, batch: torch.Tensor, device: torch.device) -> np.ndarray:
        with torch.inference_mode():
            out = nets.conv5_maps(backbone, batch.to(device, non_blocking=True))
            half = out.to(torch.float16, memory_format=torch.contiguous_format)  # the cache stores [C, h, w]
            if not bool(torch.isfinite(half).all()):
                raise SppError(f"conv5 activations overflow float16 (max |x| = {out.abs().max().item():.4g}); "
                               "the checkpoint is probably broken")
            return half.cpu().numpy()


def current_rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def load_block(dataset: VocDataset, block: list[tuple[int, str]], scales: tuple[int, ...], store_flip: bool,
               spec: nets.BackboneSpec, skip_bad: bool, device: torch.device) -> list[LoadedImage]:
    """Decode and preprocess a few images at every scale (and mirrored); runs in a prefetch thread.
    The resize runs on ``device``: on a GPU the large scales cost next to nothing there."""
    loaded = []
    for index, image_id in block:
        try:
            image = dataset.load_image(image_id)
        except InputError as err:
            if not skip_bad:
                raise
            loaded.append(LoadedImage(index, image_id, None, {}, error=str(err)))
            continue
        variants = {False: image}
        if store_flip:
            variants[True] = np.ascontiguousarray(image[:, ::-1])  # the mirrored image itself, not mirrored maps
        inputs = {(flip, scale): nets.preprocess(pixels, scale, spec, device=device)
                  for flip, pixels in variants.items() for scale in scales}
        loaded.append(LoadedImage(index, image_id, (int(image.shape[0]), int(image.shape[1])), inputs))
    return loaded


def compute_block(conv: ConvRunner, images: list[LoadedImage], batch_images: int) -> dict[str, dict]:
    """conv5 maps of a block: image id -> {map name -> float16 [C,h,w]}. Inputs of equal size share a batch."""
    maps: dict[str, dict] = {item.image_id: {} for item in images if item.image_hw is not None}
    by_size: dict[tuple[int, ...], list[tuple[LoadedImage, bool, int]]] = {}
    for item in images:
        for (flip, scale), tensor in item.inputs.items():
            by_size.setdefault(tuple(tensor.shape), []).append((item, flip, scale))
    for members in by_size.values():
        for lo in range(0, len(members), batch_images):
            chunk = members[lo:lo + batch_images]
            out = conv(torch.stack([item.inputs[(flip, scale)] for item, flip, scale in chunk]))
            for (item, flip, scale), fmap in zip(chunk, out):
                maps[item.image_id][map_name(scale, flip)] = fmap
    return maps


def extract_shard(backbone: nets.Backbone, device: torch.device, dataset: VocDataset,
                  shard: list[tuple[int, str]], writer: FeatureWriter, scales: tuple[int, ...], store_flip: bool,
                  batch_images: int, desc: str = "features") -> dict:
    """Extract this process's images into ``writer`` (resuming), finish the file, and return its metrics."""
    done = writer.open()
    for note in writer.notes:
        log.info("%s", note)
    todo = [(index, image_id) for index, image_id in shard if image_id not in done]
    blocks = [todo[lo:lo + batch_images] for lo in range(0, len(todo), batch_images)]
    conv = ConvRunner(backbone, device)
    rss_before_mb = current_rss_mb()  # the process (torch, the model) before any image: peak minus this = growth
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    computed_ids, skipped = [], {}
    start = time.perf_counter()
    progress = progress_bar(total=len(shard), initial=len(shard) - len(todo), desc=desc, unit="img",
                            dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=1) as prefetch:  # decode/resize the next block while this one runs
            future = prefetch.submit(load_block, dataset, blocks[0], scales, store_flip, backbone.spec,
                                     dataset.skip_bad, device) if blocks else None
            for number in range(len(blocks)):
                images = future.result()
                if number + 1 < len(blocks):
                    future = prefetch.submit(load_block, dataset, blocks[number + 1], scales, store_flip,
                                             backbone.spec, dataset.skip_bad, device)
                maps = compute_block(conv, images, batch_images)
                for item in images:
                    if item.image_hw is None:
                        warnings.warn(f"skipping: {item.error}", stacklevel=2)
                        skipped[item.image_id] = item.error
                    else:
                        writer.write_image(item.image_id, item.image_hw, item.index, maps.pop(item.image_id))
                        computed_ids.append(item.image_id)
                    progress.update(1)
        seconds = time.perf_counter() - start
        written = [(index, image_id) for index, image_id in shard if image_id not in skipped]
        metrics = {
            "images": len(written),
            "images_computed": len(computed_ids),
            "images_resumed": len(done),
            "images_skipped": len(skipped),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(computed_ids) / seconds, 4) if seconds > 0 else 0.0,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
            "rss_before_images_mb": rss_before_mb,
            "peak_cuda_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                             if device.type == "cuda" else None),
            "scales": list(scales),
            "flip": store_flip,
            "device": str(device),
        }
        writer.finish([image_id for _, image_id in written], [index for index, _ in written], list(skipped),
                      metrics)
    finally:
        progress.close()
        writer.close()
    metrics["computed_ids"] = computed_ids
    return metrics


