"""The conv5 feature cache: HDF5 schema, a crash-safe per-image writer, and the pooled-feature reader.

One file per split (``features.h5``), or one per torchrun rank (``features.rank<r>.h5``, images ``r::world_size``):

    /                          attrs: schema, backbone, spec_<field> (BackboneSpec), checkpoint_sha256, scales,
                                      stride, split, flip, compression, dataset_fingerprint, rank, world_size,
                                      image_ids + image_index (the images covered, and their place in the split),
                                      skipped_ids, metrics (JSON), complete
    /<image_id>/               attrs: image_hw (H, W), scales, stride, index, complete
    /<image_id>/s<scale>       float16 [C, h, w]: conv5 of the image resized to shorter side <scale>
    /<image_id>/flip_s<scale>  the same for the horizontally flipped image (training split only)

Each map is a single chunk (gzip + byte shuffle + fletcher32), so a read decompresses exactly one map and a
damaged chunk raises instead of being read as garbage. Maps are float16 on disk and float32 in compute.

Crash safety: the writer fills ``<name>.partial.h5`` and marks an image ``complete`` only after its maps are
written and flushed; reopening drops groups without that mark, so a killed extraction resumes where it stopped.
Only a finished file (every image in, file-level ``complete``) is renamed to its final name.
"""
from __future__ import annotations

import contextlib
import errno
import dataclasses
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import torch

from . import nets, spp
from .artifacts import Run
from .registry import features_tag  # noqa: F401  (the features stage's tag, named in the registry)
from .boxes import flip_boxes
from .errors import SppError, require_free_space
from .registry import command_for_path
from .handles import keep_inherited_handles

SCHEMA_VERSION = 1
FEATURES_FILE = "features.h5"
COMPLETE = "complete"  # attribute set on an image group / the file once fully written
# HDF5 1.8 file format: its object headers store a long image-id list (dense attributes, no 64 KiB limit), and
# its superblock (v2) has no "file open for write" flag: with 1.10's (v3), a killed writer leaves that flag set
# and the partial file cannot be reopened without h5clear.
LIBVER = ("v108", "v108")
# File attributes that say what a file holds: a partial file is resumed only when all of these match.
HEADER_KEYS = ("schema", "backbone", "checkpoint_sha256", "dataset_fingerprint", "split", "scales", "flip",
               "compression", "rank", "world_size")


def map_name(scale: int, flip: bool = False) -> str:
    """Dataset name of one image's conv5 map at one scale: ``s688`` or ``flip_s688``."""
    return f"{'flip_' if flip else ''}s{int(scale)}"


def shard_file_name(rank: int, world_size: int) -> str:
    """``features.h5`` for a single process, ``features.rank<r>.h5`` for torchrun rank r."""
    return FEATURES_FILE if world_size == 1 else f"features.rank{rank}.h5"


def _held_by_another_process(exc: OSError) -> bool:
    """HDF5's own file lock (flock) refused us: another process has the file open."""
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(exc).lower()


def _refuse_if_in_use(path: Path) -> None:
    """One line naming ``path`` when another process has it open (HDF5 refuses the write lock)."""
    try:
        h5py.File(path, "r+").close()
    except OSError as exc:
        if _held_by_another_process(exc):
            raise SppError("this feature file is open in another process (a stage reading it); wait for it to "
                           "finish and rerun", path) from None


def partial_path(final: Path) -> Path:
    """Where a file is written until it is finished: ``features.h5`` -> ``features.partial.h5``."""
    final = Path(final)
    return final.with_name(final.name[: -len(".h5")] + ".partial.h5")


def spec_attrs(spec: nets.BackboneSpec) -> dict[str, Any]:
    return {f"spec_{key}": value for key, value in dataclasses.asdict(spec).items()}


def spec_from_attrs(attrs: h5py.AttributeManager, path: Path) -> nets.BackboneSpec:
    values = {}
    for field in dataclasses.fields(nets.BackboneSpec):
        key = f"spec_{field.name}"
        if key not in attrs:
            raise SppError(f"feature file lacks attribute {key!r} (written by another sppnet version); "
                           f"{_rerun_hint(path)}", path)
        values[field.name] = _plain(attrs[key])
    return nets.BackboneSpec(**values)


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (str, int, float, bool, or a list of those)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _rerun_hint(path: Path) -> str:
    return f"rerun `{command_for_path(Path(path))}` to rebuild it"


def header_matches(attrs: h5py.AttributeManager, header: dict[str, Any]) -> bool:
    return all(key in attrs and _plain(attrs[key]) == _plain(np.asarray(value) if isinstance(value, (list, tuple))
                                                             else value)
               for key, value in header.items())


class FeatureWriter:
    """Appends images to ``<final>.partial.h5`` and renames it to ``<final>`` once every image is in.

    ``header`` (see ``HEADER_KEYS``) identifies what the file holds; a leftover partial file with another header
    (other scales, other checkpoint, ...) is discarded, one that HDF5 cannot open is moved aside to ``.corrupt``.
    """

    def __init__(self, final: Path, header: dict[str, Any], spec: nets.BackboneSpec, compression: int):
        if set(header) != set(HEADER_KEYS):
            raise ValueError(f"feature file header needs exactly {HEADER_KEYS}, got {sorted(header)}")
        self.final = Path(final)
        self.partial = partial_path(self.final)
        self.header = dict(header)
        self.spec = spec
        self.compression = compression
        self.notes: list[str] = []  # what resuming found, for the log
        self.file: h5py.File | None = None

    # -- open / resume ----------------------------------------------------------------------------------------
    def open(self) -> set[str]:
        """Open the partial file (resuming it when it matches the header); returns the ids already complete."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists():
            _refuse_if_in_use(self.final)  # a stage reading it keeps its file where it is
            if self.partial.exists():  # both: the final one is the newer, finished state
                self.partial.unlink()
            os.replace(self.final, self.partial)  # finished before, manifest not yet written: reuse its images
        done: set[str] = set()
        if self.partial.exists():
            done = self._resume()
        if self.file is None:
            self.file = h5py.File(self.partial, "w", libver=LIBVER)
            self.file.attrs.update({key: _attr_value(value) for key, value in self.header.items()})
            self.file.attrs.update(spec_attrs(self.spec))
            self.file.attrs["stride"] = self.spec.stride
            self.file.attrs[COMPLETE] = False
            self.file.flush()
        return done

    def _resume(self) -> set[str]:
        try:
            handle = h5py.File(self.partial, "a", libver=LIBVER)
        except OSError as exc:
            if _held_by_another_process(exc):  # not damage: never move aside a file another process has open
                raise SppError("this feature file is open in another process; wait for it to finish and rerun",
                               self.partial) from None
            aside = _move_aside(self.partial, ".corrupt")
            self.notes.append(f"{self.partial}: unreadable partial feature file ({_one_line(exc)}); moved aside to "
                              f"{aside.name}, restarting")
            return set()
        if not header_matches(handle.attrs, self.header):
            handle.close()
            self.partial.unlink()
            self.notes.append(f"{self.partial}: partial feature file was made with other settings "
                              "(scales/checkpoint/dataset); discarded, restarting")
            return set()
        done, dropped = set(), 0
        try:
            for image_id in list(handle.keys()):
                group = handle[image_id]
                if self._group_is_complete(group):
                    done.add(image_id)
                else:
                    del handle[image_id]
                    dropped += 1
            handle.attrs[COMPLETE] = False
            handle.flush()
        except (OSError, KeyError, RuntimeError) as exc:  # damaged metadata: keep the bytes, start again
            handle.close()
            aside = _move_aside(self.partial, ".corrupt")
            self.notes.append(f"{self.partial}: damaged partial feature file ({_one_line(exc)}); moved aside to "
                              f"{aside.name}, restarting")
            return set()
        self.file = handle
        self.notes.append(f"{self.partial}: resuming, {len(done)} image(s) already complete"
                          + (f", {dropped} incomplete image(s) dropped" if dropped else ""))
        return done

    def _group_is_complete(self, group: h5py.Group) -> bool:
        if not isinstance(group, h5py.Group) or not bool(group.attrs.get(COMPLETE, False)):
            return False
        scales = [int(s) for s in self.header["scales"]]
        names = [map_name(s) for s in scales] + ([map_name(s, True) for s in scales] if self.header["flip"] else [])
        for name in names:
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 3 or dataset.dtype != np.float16:
                return False
        return True

    # -- write ------------------------------------------------------------------------------------------------
    def write_image(self, image_id: str, image_hw: tuple[int, int], index: int,
                    maps: dict[str, np.ndarray]) -> None:
        """Write one image's maps (``map_name`` -> float16 [C,h,w]) and then, flushed, its ``complete`` mark."""
        assert self.file is not None, "open() first"
        # float16 before compression: an upper bound. Checked first because HDF5 cannot survive a failed write.
        require_free_space(self.partial, sum(2 * np.asarray(m).size for m in maps.values()),
                           f"the conv5 maps of image {image_id}")
        if image_id in self.file:  # an incomplete leftover (open() drops those; be safe)
            del self.file[image_id]
        group = self.file.create_group(image_id)
        group.attrs["image_hw"] = np.asarray(image_hw, dtype=np.int64)
        group.attrs["scales"] = np.asarray(self.header["scales"], dtype=np.int64)
        group.attrs["stride"] = self.spec.stride
        group.attrs["index"] = int(index)
        for name, array in maps.items():
            self._write_map(group, name, array)
        self.file.flush()  # the maps reach the file before the mark that vouches for them
        group.attrs[COMPLETE] = True
        self.file.flush()

    def _write_map(self, group: h5py.Group, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float16)
        options = dict(compression="gzip", compression_opts=self.compression, shuffle=True) if self.compression else {}
        group.create_dataset(name, data=array, chunks=array.shape, fletcher32=True, **options)

    def finish(self, image_ids: Sequence[str], image_index: Sequence[int], skipped_ids: Sequence[str],
               metrics: dict[str, Any]) -> Path:
        """Record the images covered and this process's metrics, then rename the file to its final name."""
        assert self.file is not None, "open() first"
        self.file.attrs["image_ids"] = np.asarray(list(image_ids), dtype=h5py.string_dtype())
        self.file.attrs["image_index"] = np.asarray(list(image_index), dtype=np.int64)
        self.file.attrs["skipped_ids"] = np.asarray(list(skipped_ids), dtype=h5py.string_dtype())
        self.file.attrs["metrics"] = json.dumps(metrics, sort_keys=True)
        self.file.attrs[COMPLETE] = True
        self.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.flush()
            self.file.close()
            self.file = None


def _attr_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _move_aside(path: Path, suffix: str) -> Path:
    aside = path.with_name(path.name + suffix)
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}{suffix}{n}")
        n += 1
    os.replace(path, aside)
    return aside


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_header(path: Path) -> dict[str, Any] | None:
    """The file-level attributes of a finished feature file, or None when it is missing/unfinished/unreadable."""
    try:
        with h5py.File(path, "r") as handle:
            if not bool(handle.attrs.get(COMPLETE, False)):
                return None
            return {key: _plain(value) for key, value in handle.attrs.items()}
    except (OSError, KeyError):
        return None


# -- reader -------------------------------------------------------------------------------------------------------
class FeatureCache:
    """Read side of the conv5 cache: maps per image (lazily, with a small LRU) and SPP-pooled window features.

    ``paths`` is one file or the per-rank shard files of one split. Safe to use from forked worker processes:
    each process opens its own HDF5 handles.
    """

    def __init__(self, paths: Path | str | Iterable[Path | str], max_cached_images: int = 4):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise SppError("FeatureCache needs at least one feature file")
        self.max_cached_images = max_cached_images
        self._handles: list[h5py.File | None] = [None] * len(self.paths)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, bool, int], torch.Tensor] = OrderedDict()
        self._hw: dict[str, tuple[int, int]] = {}

        located: list[tuple[int, str, int]] = []  # (split position, image id, file number)
        first: dict[str, Any] | None = None
        for number, path in enumerate(self.paths):
            handle = self._handle(number)
            attrs = handle.attrs
            if _plain(attrs.get("schema")) != SCHEMA_VERSION:
                raise SppError(f"feature file schema {_plain(attrs.get('schema'))!r}, expected {SCHEMA_VERSION}; "
                               f"{_rerun_hint(path)}", path)
            if not bool(attrs.get(COMPLETE, False)):
                raise SppError(f"unfinished feature file; {_rerun_hint(path)}", path)
            try:
                facts = {"backbone": _plain(attrs["backbone"]),
                         "scales": tuple(int(s) for s in _plain(attrs["scales"])), "flip": bool(attrs["flip"]),
                         "checkpoint_sha256": _plain(attrs["checkpoint_sha256"]),
                         "spec": spec_from_attrs(attrs, path), "split": _plain(attrs["split"])}
                ids = [str(i) for i in _plain(attrs["image_ids"])]
                positions = [int(i) for i in _plain(attrs["image_index"])]
            except KeyError as exc:
                raise SppError(f"not an sppnet feature file (no attribute {exc}); {_rerun_hint(path)}", path) from None
            if first is None:
                first = facts
            elif facts != first:
                differs = ", ".join(k for k in facts if facts[k] != first[k])
                raise SppError(f"feature shard differs from {self.paths[0].name} in {differs}; {_rerun_hint(path)}",
                               path)
            located.extend((pos, image_id, number) for pos, image_id in zip(positions, ids))
        assert first is not None
        located.sort()
        self.backbone: str = first["backbone"]
        self.spec: nets.BackboneSpec = first["spec"]
        self.scales: tuple[int, ...] = first["scales"]
        self.has_flip: bool = first["flip"]
        self.split: str = first["split"]
        self.checkpoint_sha256: str = first["checkpoint_sha256"]
        self.image_ids: list[str] = [image_id for _, image_id, _ in located]
        self._file_of: dict[str, int] = {image_id: number for _, image_id, number in located}
        if len(self._file_of) != len(self.image_ids):
            raise SppError("an image appears in two feature shards; " + _rerun_hint(self.paths[0]), self.paths[0])

    # -- HDF5 handles (one set per process) -------------------------------------------------------------------
    def _handle(self, number: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: inherited HDF5 handles must not be used
            keep_inherited_handles(self._handles)
            self._handles = [None] * len(self.paths)
            self._lru = OrderedDict()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        handle = self._handles[number]
        if handle is None:
            path = self.paths[number]
            if not path.exists():
                raise SppError(f"missing feature file; {_rerun_hint(path)}", path)
            try:
                handle = h5py.File(path, "r")
            except OSError as exc:
                raise SppError(f"corrupt or truncated feature file ({_one_line(exc)}); {_rerun_hint(path)}",
                               path) from None
            self._handles[number] = handle
        return handle

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_handles=[None] * len(self.paths), _lru=OrderedDict(), _lock=None, _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        for handle in self._handles:
            if handle is not None:
                handle.close()
        self._handles = [None] * len(self.paths)
        self._lru.clear()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._file_of

    # -- per-image access -------------------------------------------------------------------------------------
    def _group(self, image_id: str) -> tuple[h5py.Group, Path]:
        number = self._file_of.get(image_id)
        if number is None:
            raise SppError(f"image {image_id!r} is not in the feature cache of split {self.split!r}", self.paths[0])
        path = self.paths[number]
        try:
            return self._handle(number)[image_id], path
        except (KeyError, OSError) as exc:
            raise SppError(f"feature file lacks image {image_id!r} ({_one_line(exc)}); {_rerun_hint(path)}",
                           path) from None

    def image_hw(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the original image."""
        hw = self._hw.get(image_id)
        if hw is None:
            group, _ = self._group(image_id)
            height, width = (int(v) for v in group.attrs["image_hw"])
            hw = self._hw[image_id] = (height, width)
        return hw

    def _map(self, image_id: str, scale: int, flip: bool) -> torch.Tensor:
        key = (image_id, flip, int(scale))
        with self._lock:
            cached = self._lru.get(key)
            if cached is not None:
                self._lru.move_to_end(key)
                return cached
        if flip and not self.has_flip:
            raise SppError(f"feature cache of split {self.split!r} holds no flipped maps (they are stored for the "
                           "training split, and for any other split with detect.test_flip on: rerun "
                           "extract-features with it)", self.paths[self._file_of.get(image_id, 0)])
        group, path = self._group(image_id)
        try:
            array = group[map_name(scale, flip)][()]
        except (KeyError, OSError) as exc:
            raise SppError(f"cannot read map {map_name(scale, flip)} of image {image_id!r} "
                           f"({_one_line(exc)}); {_rerun_hint(path)}", path) from None
        tensor = torch.from_numpy(array.astype(np.float32))
        with self._lock:
            self._lru[key] = tensor
            while len(self._lru) > self.max_cached_images * len(self.scales) * (2 if self.has_flip else 1):
                self._lru.popitem(last=False)
        return tensor

    def maps(self, image_id: str, flip: bool = False, device: str | torch.device = "cpu",
             scales_subset: Sequence[int] | None = None) -> list[torch.Tensor]:
        """float32 conv5 maps [C,h,w], one per scale in ``self.scales`` order (or ``scales_subset``'s: only those
        are read). On the CPU these are the cached tensors themselves: do not modify them in place."""
        return [self._map(image_id, scale, flip).to(device) for scale in self._candidate_scales(scales_subset)]

    def scale_indices(self, image_id: str, boxes: np.ndarray, scale_choice: str | int | np.ndarray = "best",
                      rng: np.random.Generator | None = None, scales_subset: Sequence[int] | None = None,
                      rule: str = "code") -> tuple[tuple[int, ...], np.ndarray]:
        """The candidate scales and each window's index into them, as ``pooled`` chooses them."""
        scales = self._candidate_scales(scales_subset)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if isinstance(scale_choice, np.ndarray):  # chosen already, one index per window
            index = scale_choice.astype(np.int64).reshape(-1)
            if len(index) != len(boxes) or (len(index) and not 0 <= index.min() <= index.max() < len(scales)):
                raise ValueError(f"{len(index)} scale indices for {len(boxes)} windows and scales {scales}")
            return scales, index
        if isinstance(scale_choice, (int, np.integer)) and not isinstance(scale_choice, bool):
            if not 0 <= int(scale_choice) < len(scales):
                raise ValueError(f"scale index {scale_choice} out of range for scales {scales}")
            return scales, np.full(len(boxes), int(scale_choice), dtype=np.int64)
        if scale_choice == "best":
            # Flipping keeps box sizes and the image size, so the flipped window gets the same scale.
            index = spp.choose_scale(boxes, self.image_hw(image_id), scales, rule=rule)
            return scales, np.asarray(index, dtype=np.int64).reshape(-1)
        if scale_choice == "random":
            if rng is None:
                raise ValueError("scale_choice='random' needs rng (a seeded np.random.Generator)")
            return scales, rng.integers(0, len(scales), size=len(boxes)).astype(np.int64)
        raise ValueError(f"scale_choice must be 'best', 'random' or an index, got {scale_choice!r}")

    def pooled(self, image_id: str, boxes: np.ndarray, pyramid: Sequence[int],
               scale_choice: str | int | np.ndarray = "best",
               rng: np.random.Generator | None = None, flip: bool = False,
               scales_subset: Sequence[int] | None = None, device: str | torch.device = "cpu",
               rule: str = "code") -> torch.Tensor:
        """SPP features [N, C*sum(n*n)] float32 of windows given in original-image coordinates.

        ``scale_choice``: "best" (SPEC §2 scale choice over the candidate scales), "random" (uniform per window,
        from ``rng``), an index into the candidate scales, or an array of one such index per window. Candidates
        are ``scales_subset`` (e.g. ``(688,)`` for the 1-scale setting) or all cached scales. ``flip``: pool the
        same windows of the flipped image (boxes are flipped here). Only the maps of scales actually chosen are
        read.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scales, index = self.scale_indices(image_id, boxes, scale_choice, rng, scales_subset, rule)
        height, width = self.image_hw(image_id)
        if flip:
            boxes = flip_boxes(boxes, width)
        if len(boxes) == 0:
            return torch.zeros((0, self.spec.channels * sum(n * n for n in pyramid)), dtype=torch.float32,
                               device=device)
        used = np.unique(index)
        fmaps = [self._map(image_id, scales[u], flip).to(device) for u in used]
        return spp.pool_windows(fmaps, (height, width), [scales[u] for u in used], boxes, self.spec,
                                tuple(pyramid), scale_index=np.searchsorted(used, index), rule=rule)

    def _candidate_scales(self, scales_subset: Sequence[int] | None) -> tuple[int, ...]:
        if scales_subset is None:
            return self.scales
        subset = tuple(int(s) for s in scales_subset)
        missing = [s for s in subset if s not in self.scales]
        if missing or not subset:
            raise SppError(f"scales {list(missing) or list(subset)} are not in the feature cache (it holds "
                           f"{list(self.scales)}); rerun `{command_for_path(self.paths[0])} --scales ...` with them",
                           self.paths[0])
        return subset


def feature_paths(manifest) -> list[Path]:
    """The feature files a features-stage manifest lists: ``features`` or ``features.rank<r>`` in rank order."""
    outputs = manifest.data.get("outputs", {})
    if "features" in outputs:
        return [manifest.output("features")]
    shards = sorted((int(name.rsplit("rank", 1)[1]), name) for name in outputs if name.startswith("features.rank"))
    if not shards:
        raise SppError("features manifest lists no feature files", manifest.path)
    return [manifest.output(name) for _, name in shards]


def cache_of(manifest) -> FeatureCache:
    """The feature cache a finished extract-features manifest describes."""
    return FeatureCache(feature_paths(manifest))


def features_for(run: Run, split: str, conv_from: str = "pretrain") -> FeatureCache:
    """The finished, fresh feature cache of a split, made by the pretrained conv layers or (``conv_from=
    "finetune"``) by those of a --conv fine-tuned model; one-line error naming the command when it is not there."""
    return cache_of(run.require("features", features_tag(split, conv_from)))
