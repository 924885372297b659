"""Resolve a run's config: the run's saved config (or a preset, or defaults) <- command-line overrides."""
from __future__ import annotations

import tomllib
from pathlib import Path

from .artifacts import atomic_write_json
from .config import Config, _nest, build_config, config_from_run, merge
from .errors import SppError


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
    config unless ``--config`` names a preset. Options and ``--set`` apply on top; the result is saved."""
    flat = {k: v for k, v in overrides.items() if v is not None}
    flat.update(parse_sets(sets))
    base_run = Config()
    base_run = merge(base_run, _nest({k: v for k, v in flat.items() if k in ("run", "runs_root")}))
    saved = base_run.run_dir / "config.json"
    if preset:
        cfg = build_config(preset)
    elif saved.exists():
        cfg = config_from_run(base_run.run_dir)
    else:
        dataset = flat.get("data.dataset", "synth")
        cfg = build_config("synth" if dataset == "synth" else "voc2007-zf5")
    cfg = merge(cfg, _nest(flat))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.run_dir) / "config.json", cfg.to_dict())
    return cfg
