"""Resolve a run's config: the run's saved config (or a preset, or defaults) <- command-line overrides."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tomllib
from pathlib import Path

from .artifacts import atomic_write_json
from .config import Config, _nest, build_config, config_from_run, merge
from .errors import SppError

log = logging.getLogger(__name__)
# The defaults of data.voc_root when it is empty (stages/core/voc.py's resolve_voc_root reads the same).
SYNTH_VOC_ROOT = "data/synth"
_TORCHVISION_WEIGHTS = re.compile(r"\w+_Weights\.\w+")  # model.weights naming torchvision weights, not a file


def parse_sets(sets: tuple[str, ...] | list[str]) -> dict:
    """``["finetune.iters=500", "features.scales=[688]"]`` -> ``{"finetune.iters": 500, ...}`` (TOML values)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SppError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word is a string
    return out


def resolve_config(preset: str | None, overrides: dict, sets=()) -> Config:
    """A new run takes the preset (default ``synth`` for the synth dataset); an existing run keeps its saved
    config unless ``--config`` names a preset. Options and ``--set`` apply on top, and every value is validated
    by the config types. Nothing is written: the stage runner saves the config when a stage actually runs
    (``save_run_config``), so a command that only reads, or fails, leaves the run as it was.

    Every path comes back absolute (``absolute_paths``): relative ones, given or default, are taken from the
    working directory of this command, so what a run saves never depends on where a later command runs."""
    flat = {k: v for k, v in overrides.items() if v is not None}
    flat.update(parse_sets(sets))
    base_run = Config()
    base_run = merge(base_run, _nest({k: v for k, v in flat.items() if k in ("run", "runs_root")}))
    check_run_location(base_run.run_dir)
    saved = base_run.run_dir / "config.json"
    if preset:
        cfg, source = build_config(preset), f"preset {preset}"
    elif saved.exists():
        cfg, source = config_from_run(base_run.run_dir), str(saved)
    else:
        dataset = flat.get("data.dataset", "synth")
        preset = "synth" if dataset == "synth" else "voc2007-zf5"
        cfg, source = build_config(preset), f"preset {preset} (new run)"
    cfg = absolute_paths(merge(cfg, _nest(flat)), run_dir=base_run.run_dir)
    log.debug("run %s: config from %s%s", cfg.run_dir, source, f", with {', '.join(sorted(flat))}" if flat else "")
    return cfg


def absolute_paths(cfg: Config, run_dir: Path | None = None) -> Config:
    """``cfg`` with every path absolute, relative ones taken from the working directory: ``runs_root`` (and
    ``run``) from ``run_dir``, the folder the run is in (so a run moved or copied elsewhere is the run where it
    is now); ``data.voc_root``, its default filled in when empty (``data/synth`` for the synth dataset,
    ``$SPP_VOC_ROOT`` or ``data/VOCdevkit`` for voc2007); ``model.weights`` when it names a file (not a
    torchvision weights name); ``pretrain.data`` and ``pretrain.init`` when set."""
    from .voc import DEFAULT_VOC_ROOT, VOC_ROOT_ENV

    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    voc_root = cfg.data.voc_root
    if not voc_root:
        if cfg.data.dataset == "synth":
            voc_root = SYNTH_VOC_ROOT
        elif cfg.data.dataset == "voc2007":
            voc_root = os.environ.get(VOC_ROOT_ENV) or str(DEFAULT_VOC_ROOT)
    weights = cfg.model.weights
    if weights and not _TORCHVISION_WEIGHTS.fullmatch(weights):
        weights = _absolute(weights)
    return dataclasses.replace(
        cfg, run=run_dir.name, runs_root=_absolute(run_dir.parent),
        data=dataclasses.replace(cfg.data, voc_root=_absolute(voc_root) if voc_root else ""),
        model=dataclasses.replace(cfg.model, weights=weights),
        pretrain=dataclasses.replace(cfg.pretrain, data=_absolute(cfg.pretrain.data) if cfg.pretrain.data else "",
                                     init=_absolute(cfg.pretrain.init) if cfg.pretrain.init else ""))


def _absolute(path: str | os.PathLike) -> str:
    """An absolute, normalised path (``~`` expanded; symbolic links kept as the user named them)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def check_run_location(run_dir: Path) -> None:
    """One line naming the path when the run folder cannot be one: a regular file is in the way."""
    for path in [Path(run_dir), *Path(run_dir).parents]:
        if path.exists():
            if not path.is_dir():
                raise SppError("not a folder: a run directory cannot be made under a regular file", path)
            return


def save_run_config(cfg: Config) -> None:
    """Write the run's ``config.json`` (validated values, no machine settings), when it differs from what is there."""
    path = Path(cfg.run_dir) / "config.json"
    body = cfg.experiment_dict()
    try:
        if json.loads(path.read_text()) == body:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, body)
