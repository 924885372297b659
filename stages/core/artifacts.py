"""Run directory, per-stage folders, manifests, fingerprints and atomic writes.

Layout: ``<runs_root>/<run>/<NN_stage>/[<tag>/]`` holding the stage's outputs and a ``MANIFEST.json`` that is
written last and atomically. No manifest means the stage did not finish, so nothing downstream trusts it.
A manifest records the fingerprints of its inputs; a downstream stage refuses an input whose fingerprint has
changed since (stale) with one line naming the command to rerun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import SppError, StageInputMissing
from .registry import STAGES, command_line  # names, folders and commands of the stages

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_SCHEMA = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def code_version() -> str:
    """The git commit of the code (with ``+dirty`` when modified), or the package version outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("sppnet")
        except PackageNotFoundError:
            return "unknown"


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict

    @property
    def fingerprint(self) -> str:
        """Changes whenever the stage reran with other inputs, config or results."""
        return self.data["fingerprint"]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def output(self, name: str) -> Path:
        """Absolute path of a named output (stored relative to the stage folder)."""
        try:
            return self.folder / self.data["outputs"][name]
        except KeyError:
            raise SppError(f"manifest has no output {name!r}", self.path) from None

    @property
    def metrics(self) -> dict:
        return self.data.get("metrics", {})


# A metric of the stages that write a checkpoint: the sha256 of its conv layers alone (``nets.conv_layers_sha256``).
CONV_LAYERS_PART = "conv_layers_sha256"


@dataclass(frozen=True)
class UsedPart:
    """An upstream stage of which a stage uses only one part, e.g. only the conv layers of a checkpoint whose fc
    layers change with ``model.fc_dim``: declared like its manifest, but recorded by the fingerprint of that part
    (the upstream manifest's metric named ``part``), so a change elsewhere upstream does not make this one stale.
    A manifest without that metric (written by older code) stands for all its parts: its own fingerprint."""

    manifest: Manifest
    part: str  # the upstream metric that fingerprints the part, e.g. CONV_LAYERS_PART

    @property
    def fingerprint(self) -> str:
        return part_fingerprint(self.manifest, self.part)


def part_fingerprint(manifest: Manifest, part: str) -> str:
    return str(manifest.metrics.get(part) or manifest.fingerprint)


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise SppError(f"unreadable manifest ({exc})", path) from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA or "fingerprint" not in data:
        raise SppError("not an sppnet manifest of schema %d" % MANIFEST_SCHEMA, path)
    return Manifest(Path(path), data)


@dataclass
class Run:
    """A run directory: ``<root>/<NN_stage>/[<tag>/]`` per stage."""

    root: Path
    # While a stage runs (``runner.execute``): the (stage, tag) pairs it declared; requiring any other is an error.
    allowed_inputs: set | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def stage_dir(self, stage: str, tag: str | None = None) -> Path:
        folder = self.root / STAGES[stage].folder
        return folder / _safe_tag(tag) if tag else folder

    def manifest_path(self, stage: str, tag: str | None = None) -> Path:
        return self.stage_dir(stage, tag) / MANIFEST_NAME

    def command_for(self, stage: str, tag: str | None) -> str:
        """The command that makes this stage's output, ready to paste (``--run`` and ``--runs-root`` included)."""
        return command_line(self.root, stage, tag)

    def require(self, stage: str, tag: str | None = None) -> Manifest:
        """The finished upstream stage's manifest, checked to be fresh and to still have every output it recorded;
        else one line naming the command to run."""
        if self.allowed_inputs is not None and (stage, tag) not in self.allowed_inputs:
            raise SppError(f"stage opened an input it did not declare: '{stage}'{f' ({tag})' if tag else ''}")
        path = self.manifest_path(stage, tag)
        what = f"stage '{stage}'{f' ({tag})' if tag else ''}"
        try:
            manifest = read_manifest(path)
        except FileNotFoundError:
            raise StageInputMissing(
                f"missing input: {what} has not finished in {self.root} "
                f"(no {path.relative_to(self.root)}); run `{self.command_for(stage, tag)}` first") from None
        stale = self.stale_inputs(manifest)
        if stale:
            raise StageInputMissing(
                f"stale input: {what} was built from an older {', '.join(stale)}; "
                f"rerun `{self.command_for(stage, tag)}`")
        changed = changed_outputs(manifest)
        if changed:
            paths = ", ".join(str(manifest.folder / rel) for rel in changed)
            raise StageInputMissing(f"missing input: {what} lost or changed its output {paths} since it finished; "
                                    f"rerun `{self.command_for(stage, tag)}`")
        return manifest

    def stale_inputs(self, manifest: Manifest) -> list[str]:
        """Names of the manifest's recorded upstream stages whose current fingerprint differs (or vanished)."""
        stale = []
        for name, recorded in manifest.data.get("inputs", {}).items():
            if not isinstance(recorded, dict) or "manifest" not in recorded:
                continue  # a plain file fingerprint: checked by whoever owns that file
            upstream = self.root / recorded["manifest"]
            try:
                manifest_now = read_manifest(upstream)
                current = (part_fingerprint(manifest_now, recorded["part"]) if "part" in recorded
                           else manifest_now.fingerprint)
            except (FileNotFoundError, SppError):
                current = None
            if current != recorded["fingerprint"]:
                stale.append(name)
        return stale

    def is_up_to_date(self, stage: str, tag: str | None, config: dict, inputs: dict[str, Any],
                      folder: Path | None = None) -> bool:
        """True when the stage already finished with this config and these exact inputs, and every output it
        recorded is still there with the size it had (so it can be skipped)."""
        return self.finished_manifest(stage, tag, config, inputs, folder) is not None

    def finished_manifest(self, stage: str, tag: str | None, config: dict, inputs: dict[str, Any],
                          folder: Path | None = None) -> Manifest | None:
        """The manifest when ``is_up_to_date``, else None (one read of it)."""
        try:
            manifest = read_manifest((folder or self.stage_dir(stage, tag)) / MANIFEST_NAME)
        except (FileNotFoundError, SppError):
            return None
        fresh = (manifest.data.get("config") == json.loads(json.dumps(config, default=_json_default))
                 and manifest.data.get("inputs") == self._input_records(inputs) and not changed_outputs(manifest))
        return manifest if fresh else None

    def _input_records(self, inputs: dict[str, Any]) -> dict:
        records = {}
        for name, value in inputs.items():
            if isinstance(value, Manifest):
                records[name] = {"manifest": str(value.path.relative_to(self.root)), "fingerprint": value.fingerprint}
            elif isinstance(value, UsedPart):
                records[name] = {"manifest": str(value.manifest.path.relative_to(self.root)), "part": value.part,
                                 "fingerprint": value.fingerprint}
            else:
                records[name] = value  # already a fingerprint (str or dict), e.g. of the dataset split
        return json.loads(json.dumps(records, default=_json_default))

    def write_manifest(self, stage: str, tag: str | None, *, config: dict, inputs: dict[str, Any],
                       outputs: dict[str, str | Path], metrics: dict | None = None,
                       wall_time_s: float | None = None, folder: Path | None = None) -> Manifest:
        """Write the stage's manifest last and atomically. ``outputs`` paths are stored relative to the folder,
        with their sizes, so that a deleted or rewritten output makes the stage out of date."""
        folder = Path(folder) if folder is not None else self.stage_dir(stage, tag)
        rel_outputs = {}
        for name, out in outputs.items():
            out = Path(out)
            # An absolute path, or one that starts with the stage folder as given (relative to the working
            # directory), is made relative to the folder; a bare relative name already is.
            if out.is_absolute() or out.parts[:len(folder.parts)] == folder.parts:
                out = out.resolve().relative_to(folder.resolve())
            rel_outputs[name] = str(out)
            if not (folder / rel_outputs[name]).exists():
                raise SppError(f"stage '{stage}' declared output {name!r} but did not write it", folder / out)
        body = {
            "schema": MANIFEST_SCHEMA,
            "stage": stage,
            "tag": tag,
            "config": config,
            "inputs": self._input_records(inputs),
            "outputs": rel_outputs,
            "output_sizes": {name: output_size(folder / rel) for name, rel in rel_outputs.items()},
            "metrics": metrics or {},
            "code_version": code_version(),
            "wall_time_s": wall_time_s,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        body = json.loads(json.dumps(body, default=_json_default))
        body["fingerprint"] = sha256_json({k: v for k, v in body.items() if k not in ("created", "wall_time_s")})
        path = folder / MANIFEST_NAME
        atomic_write_json(path, body)
        return Manifest(path, body)

    def invalidate(self, stage: str, tag: str | None = None, folder: Path | None = None) -> None:
        """Remove a stage's manifest before it (re)writes outputs, so a half-done rerun is never trusted."""
        with contextlib.suppress(FileNotFoundError):
            ((folder or self.stage_dir(stage, tag)) / MANIFEST_NAME).unlink()


def output_size(path: Path) -> int:
    """Bytes of an output file, or of every file under an output folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def changed_outputs(manifest: Manifest) -> list[str]:
    """Names of the manifest's outputs that are gone or no longer have the size it recorded."""
    sizes = manifest.data.get("output_sizes", {})
    changed = []
    for name, rel in manifest.data.get("outputs", {}).items():
        path = manifest.folder / rel
        try:
            size = output_size(path) if path.exists() else None
        except OSError:
            size = None
        if size is None or sizes.get(name, size) != size:  # manifests older than output_sizes: existence only
            changed.append(rel)
    return changed


def _safe_tag(tag: str) -> str:
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        raise SppError(f"invalid stage tag {tag!r}: use a plain name such as a split")
    return tag


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    """``with timed() as t: ...`` then ``t['seconds']``."""
    box = {"start": time.perf_counter()}
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - box["start"]


@dataclass(frozen=True)
class StageResult:
    """What a stage's ``run`` returns to the CLI: its manifest and a short human summary."""

    manifest: Manifest | None  # None for commands that write no stage folder (e.g. detect --images)
    summary: str = ""
    skipped: bool = False
    extra: dict = field(default_factory=dict)
