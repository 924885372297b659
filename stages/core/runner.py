"""The one stage runner: every stage declares a ``StagePlan``; ``execute`` does the rest the same way for all.

A plan names what a stage reads (upstream manifests from ``Run.require``, or fingerprints of files outside the
run), the config record its results depend on, and what it writes (paths relative to its folder). ``execute``:

1. skips the stage when its manifest matches the plan and every recorded output is still there with its size
   (this writes nothing, so an up-to-date stage still reports in a read-only run);
2. makes the stage folder (an unusable place is one line naming it) and takes the folder's lock: a second
   process on the same stage stops with one line naming the first; the lock is the kernel's (``flock``), so a
   killed process leaves nothing that blocks;
3. removes the old manifest, runs the body (which may only ``require`` inputs it declared) and times it; once
   the body succeeded, saves the run's config (validated, machine settings left out) and writes the manifest
   last, atomically.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from .artifacts import Manifest, Run, StageResult, UsedPart, atomic_write_json
from .errors import SppError

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class StagePlan:
    """What one run of a stage declares before it does any work."""

    stage: str  # a name in ``registry.STAGES``
    tag: str | None  # which of the stage's outputs (a split, a variant); None for one-per-run stages
    config: dict  # everything in the config its results depend on
    inputs: dict[str, Any]  # name -> upstream ``Manifest`` (or ``UsedPart`` of one), or a fingerprint (str / dict)
    outputs: dict[str, str]  # name -> path relative to the stage folder
    folder: Path | None = None  # where it writes; default: the run's folder for (stage, tag)

    def declared_inputs(self) -> set[tuple[str, str | None]]:
        manifests = [m.manifest if isinstance(m, UsedPart) else m for m in self.inputs.values()]
        return {(m.data["stage"], m.data.get("tag")) for m in manifests if isinstance(m, Manifest)}


@dataclass
class Produced:
    """What a stage's body returns."""

    metrics: dict
    summary: str = ""  # printed under the stage's own summary of its metrics
    extra: dict = field(default_factory=dict)
    write_manifest: bool = True  # False: this process's part is done, another writes the manifest (torchrun rank)


def stage_folder(run: Run, plan: StagePlan) -> Path:
    return Path(plan.folder) if plan.folder is not None else run.stage_dir(plan.stage, plan.tag)


def up_to_date_manifest(run: Run, plan: StagePlan, verify: Callable[[Manifest], bool] | None = None
                        ) -> Manifest | None:
    """The stage's manifest when the plan is already done (reads only), else None."""
    manifest = run.finished_manifest(plan.stage, plan.tag, plan.config, plan.inputs, folder=stage_folder(run, plan))
    if manifest is None or manifest.data.get("outputs") != plan.outputs:  # or it now writes other files than it did
        return None
    return manifest if verify is None or verify(manifest) else None


def execute(run: Run, plan: StagePlan, body: Callable[[Path], Produced], *, describe: Callable[[dict], str],
            cfg=None, verify: Callable[[Manifest], bool] | None = None, lock_name: str = LOCK_NAME) -> StageResult:
    """Run ``body(folder)`` under the contract above; ``describe(metrics)`` is the stage's summary."""
    done = up_to_date_manifest(run, plan, verify)
    if done is not None:
        return StageResult(done, summary=describe(done.metrics), skipped=True)
    folder = stage_folder(run, plan)
    make_writable_folder(folder)
    with stage_lock(folder, plan, lock_name):
        done = up_to_date_manifest(run, plan, verify)  # another process may have finished it while we looked
        if done is not None:
            return StageResult(done, summary=describe(done.metrics), skipped=True)
        run.invalidate(plan.stage, plan.tag, folder=folder)
        started = time.perf_counter()
        previous, run.allowed_inputs = run.allowed_inputs, plan.declared_inputs()
        try:
            produced = body(folder)
        finally:
            run.allowed_inputs = previous
        if cfg is not None:  # only now: a value that made the stage fail never reaches the run's config
            from .runconfig import save_run_config
            save_run_config(cfg)
        if not produced.write_manifest:
            return StageResult(None, summary=produced.summary, extra=produced.extra)
        manifest = run.write_manifest(plan.stage, plan.tag, config=plan.config, inputs=plan.inputs,
                                      outputs=plan.outputs, metrics=produced.metrics,
                                      wall_time_s=time.perf_counter() - started, folder=folder)
    summary = describe(manifest.metrics)
    if produced.summary:
        summary = f"{summary}\n{produced.summary}" if summary else produced.summary
    return StageResult(manifest, summary=summary, extra=produced.extra)


def make_writable_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) and check that files can be made in it; else one line naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise SppError(f"cannot write here ({unusable_reason(exc)})", _first_problem(folder)) from None


def unusable_reason(exc: OSError) -> str:
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a regular file is in the way",
               errno.EEXIST: "a regular file is in the way", errno.ENOSPC: "no space left on the device"}
    return reasons.get(exc.errno, exc.strerror or type(exc).__name__)


def _first_problem(folder: Path) -> Path:
    """The nearest existing ancestor that is not a writable folder (what the user has to fix), else ``folder``."""
    for path in [folder, *folder.parents]:
        if path.exists():
            if not path.is_dir() or not os.access(path, os.W_OK):
                return path
            return folder if path == folder else path
    return folder


@contextlib.contextmanager
def stage_lock(folder: Path, plan: StagePlan, lock_name: str = LOCK_NAME):
    """Hold the stage folder's lock, or stop with one line naming the process that holds it."""
    lock = FileLock(str(folder / lock_name), timeout=0)
    owner_file = folder / f"{lock_name}.owner"
    try:
        owner = _acquire_or_owner(lock, owner_file)
    except OSError as exc:
        raise SppError(f"cannot lock the stage folder ({unusable_reason(exc)})", folder) from None
    if owner is not None:
        raise SppError(f"stage '{plan.stage}'{f' ({plan.tag})' if plan.tag else ''} is being run by "
                       f"{owner}; wait for it to finish (or stop it) and run again", folder)
    try:
        # Written whole, then renamed (a reader never sees half of it). The note is a courtesy: no note (a full
        # disk, say) must not stop the stage.
        with contextlib.suppress(OSError):
            atomic_write_json(owner_file, {"pid": os.getpid(), "command": _command_of_this_process(),
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()


def _command_of_this_process() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"


OWNER_NOTE_PATIENCE_S = 2.0  # how long a held lock may lack its holder's note before the holder is anonymous


def _acquire_or_owner(lock: FileLock, owner_file: Path) -> str | None:
    """Take ``lock`` (None), or describe the process holding it.

    The holder writes its note just after taking the lock and removes it just before letting go, so for a moment
    a held lock can have no note: keep trying both for ``OWNER_NOTE_PATIENCE_S`` before calling the holder
    anonymous.
    """
    deadline = time.monotonic() + OWNER_NOTE_PATIENCE_S
    while True:
        try:
            lock.acquire()
            return None
        except Timeout:
            owner = _describe_owner(owner_file)
            if owner is not None:
                return owner
        if time.monotonic() >= deadline:
            return "another process"
        time.sleep(0.05)


def _describe_owner(owner_file: Path) -> str | None:
    """The note's process, or None when there is no readable note or it names a process gone from this machine
    (a killed holder's note, not yet replaced by the new holder's)."""
    try:
        owner = json.loads(owner_file.read_text())
        pid = int(owner["pid"])
        description = f"process {pid} (`{owner['command']}`, since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, but not ours to signal
        pass
    return description
