"""``spp pretrain``, its data: the ImageFolder classification set (where it is, reading it, its fingerprint),
the train / val transforms (pixels preprocessed exactly as the detector's), the size of each epoch (multi-size
training) and the data loaders, whose worker streams depend only on (seed, epoch, rank).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..core import nets
from ..core.config import Config
from ..core.errors import InputError, SppError
from ..core.voc import load_image_rgb, resolve_voc_root


# -- data ---------------------------------------------------------------------------------------------------------
def classification_root(cfg: Config) -> Path | None:
    """The ImageFolder tree: ``pretrain.data``, else the synth dataset's ``classification/``; None for others."""
    if cfg.pretrain.data:
        return Path(cfg.pretrain.data)
    if cfg.data.dataset == "synth":
        return resolve_voc_root("synth", cfg.data.voc_root) / "classification"
    return None


def _load_rgb(path: str):
    """ImageFolder loader: one-line InputError naming a corrupt/unreadable file (greys replicated to RGB)."""
    from PIL import Image

    return Image.fromarray(load_image_rgb(Path(path)))


def _image_tree(root: Path, split: str) -> ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"no {split}/ folder: a classification set is an ImageFolder tree "
                         f"{split}/<class>/<image>", root)
    try:
        return ImageFolder(str(folder), loader=_load_rgb)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or a class folder without images
        raise InputError(f"not a usable ImageFolder tree ({' '.join(str(exc).split())})", folder) from None


def _tree_fingerprint(root: Path, trees: dict[str, ImageFolder]) -> str:
    """Changes when a class or an image file is added, removed, renamed or resized (no content hashing, which
    would take minutes on an ImageNet-sized tree)."""
    digest = hashlib.sha256()
    for split, tree in trees.items():
        digest.update(f"{split}\n{chr(10).join(tree.classes)}\n".encode())
        for path, label in tree.samples:
            digest.update(f"{Path(path).relative_to(root)}\t{label}\t{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


class _ToNetInput:
    """PIL RGB image -> the backbone's preprocessed float tensor [3, h, w] (shorter side ``size``), via
    ``nets.preprocess`` so the pixel mode (BGR-128 or ImageNet mean/std) is defined in one place."""

    def __init__(self, size: int, spec: nets.BackboneSpec):
        self.size, self.spec = size, spec

    def __call__(self, image) -> torch.Tensor:
        return nets.preprocess(np.array(image), self.size, self.spec)  # a writable copy for torch


def train_transform(size: int, spec: nets.BackboneSpec, crop_scale: tuple[float, float]) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        transforms.RandomHorizontalFlip(),
        _ToNetInput(size, spec),
    ])


def val_transform(size: int, spec: nets.BackboneSpec) -> transforms.Compose:
    return transforms.Compose([_ToNetInput(size, spec), transforms.CenterCrop(size)])


def epoch_size(sizes: tuple[int, ...], epoch: int) -> int:
    """Multi-size training: whole epochs alternate over the sizes [P §2.4] (``epoch`` 0-based)."""
    return sizes[epoch % len(sizes)]


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the loader's worker RNGs from (seed, epoch, rank) only, so a resumed epoch draws the same crops."""
    state = np.random.SeedSequence([seed, epoch, rank, 0x5099]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _unwrap_worker_error(err: SppError) -> SppError:
    """A DataLoader worker re-raises our one-line error wrapped in its traceback: keep the original line."""
    text = str(err)
    for marker in ("InputError: ", "SppError: "):
        if "DataLoader worker" in text and marker in text:
            return type(err)(text.rpartition(marker)[2])
    return err


def _loader(dataset, batch_size: int, sampler, workers: int, device: torch.device, generator=None,
            drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, generator=generator)
