"""Resolve a run's config: the run's saved config (or a preset, or defaults) <- command-line overrides."""
from __future__ import annotations

import json
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
    config unless ``--config`` names a preset. Options and ``--set`` apply on top, and every value is validated
    by the config types. Nothing is written: the stage runner saves the config when a stage actually runs
    (``save_run_config``), so a command that only reads, or fails, leaves the run as it was."""
    flat = {k: v for k, v in overrides.items() if v is not None}
    flat.update(parse_sets(sets))
    base_run = Config()
    base_run = merge(base_run, _nest({k: v for k, v in flat.items() if k in ("run", "runs_root")}))
    check_run_location(base_run.run_dir)
    saved = base_run.run_dir / "config.json"
    if preset:
        cfg = build_config(preset)
    elif saved.exists():
        cfg = config_from_run(base_run.run_dir)
    else:
        dataset = flat.get("data.dataset", "synth")
        cfg = build_config("synth" if dataset == "synth" else "voc2007-zf5")
    return merge(cfg, _nest(flat))


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
