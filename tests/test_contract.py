"""The stage contract: one registry, one runner, run state that does not stick, locks, unusable places.

One tiny run is made once for the module (every stage through the CLI, recording which files each command
opens); the tests that change a run work on a copy of it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
from click.testing import CliRunner

from sppcli.cli import cli
from stages import synth
from stages.core import registry
from stages.core.artifacts import MANIFEST_NAME, Run, read_manifest
from stages.core.config import build_config
from stages.core.errors import SppError, StageInputMissing
from stages.core import runner
from stages.core.runner import StagePlan, stage_lock

REPO = Path(__file__).resolve().parents[1]
SPP = Path(sys.executable).parent / "spp"
TINY = ["model.fc_dim=32", "features.scales=[96, 128]", "features.one_scale=128", "pretrain.sizes=[64, 80]",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.workers=0", "proposals.max_boxes=60",
        "proposals.workers=1", "finetune.iters=6", "finetune.lr_steps=[4]", "finetune.eval_every=3",
        "finetune.batch_size=16", "finetune.holdout_batches=1"]
# (label, stage, tag, command arguments) in pipeline order
STEPS = [
    ("pretrain", "pretrain", None, ["pretrain"]),
    ("proposals trainval", "proposals", "trainval", ["proposals", "--split", "trainval"]),
    ("proposals test", "proposals", "test", ["proposals", "--split", "test"]),
    ("features trainval", "features", "trainval", ["extract-features", "--split", "trainval"]),
    ("features test", "features", "test", ["extract-features", "--split", "test"]),
    ("finetune", "finetune", None, ["finetune"]),
    ("svm", "svm", "ftfc7-s1", ["train-svm", "--feature", "ftfc7", "--one-scale"]),
    ("bbox", "bbox", "s1", ["train-bbox", "--one-scale"]),
    ("detect", "detect", "test-ftfc7-s1-bb", ["detect", "--feature", "ftfc7", "--one-scale", "--bbox"]),
    ("eval", "eval", "test-ftfc7-s1-bb", ["eval", "--feature", "ftfc7", "--one-scale", "--bbox"]),
]


class OpenLog:
    """Files opened (Python ``open`` and ``h5py.File``) under one folder while ``active``."""

    def __init__(self, root: Path):
        self.root, self.active, self.paths = str(root.resolve()), False, set()
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.note(args[0])

    def note(self, path) -> None:
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(self.root + os.sep):
            self.paths.add(Path(path))


def _invoke(*args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    devkit = root / "synth"
    synth.generate(devkit, seed=1, images=12, crops_per_class=6)
    runs = root / "runs"
    common = ["--run", "r", "--runs-root", str(runs), "--dataset", "synth", "--voc-root", str(devkit),
              "--device", "cpu"]
    log = OpenLog(runs)
    real_init = h5py.File.__init__

    def logged_init(self, name, *args, **kwargs):
        if log.active and isinstance(name, (str, os.PathLike)):
            log.note(name)
        real_init(self, name, *args, **kwargs)

    opened = {}
    h5py.File.__init__ = logged_init
    try:
        for index, (label, _, _, args) in enumerate(STEPS):
            extra = ["--config", "synth", *[a for s in TINY for a in ("--set", s)]] if index == 0 else []
            log.paths, log.active = set(), True
            _invoke(*args, *common, *extra)
            log.active = False
            opened[label] = set(log.paths)
    finally:
        h5py.File.__init__ = real_init
    return SimpleNamespace(root=root, devkit=devkit, runs=runs, common=common, opened=opened)


def _copy(finished, tmp_path: Path, name: str = "r") -> tuple[Run, list[str]]:
    runs = tmp_path / "runs"
    shutil.copytree(finished.runs / "r", runs / name, symlinks=True)
    common = ["--run", name, "--runs-root", str(runs), "--dataset", "synth", "--voc-root", str(finished.devkit)]
    return Run(runs / name), common


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# -- what a stage opens is what it declares -------------------------------------------------------------------------
def _stage_of(run_root: Path, path: Path) -> tuple[str, str | None] | None:
    parts = path.relative_to(run_root).parts
    by_folder = {info.folder: info for info in registry.STAGES.values()}
    info = by_folder.get(parts[0])
    if info is None:
        return None  # run-level files (config.json)
    return info.name, (parts[1] if info.tagged_by and len(parts) > 2 else None)


def test_every_stage_opens_only_what_it_declares(finished):
    run = Run(finished.runs / "r")
    for label, stage, tag, _ in STEPS:
        manifest = read_manifest(run.manifest_path(stage, tag))
        declared = {(m["manifest"].split("/")[0], m["manifest"].split("/")[1] if m["manifest"].count("/") == 2
                     else None) for m in manifest.data["inputs"].values() if isinstance(m, dict) and "manifest" in m}
        declared = {(next(i.name for i in registry.STAGES.values() if i.folder == f), t) for f, t in declared}
        assert finished.opened[label], label
        for path in finished.opened[label]:
            owner = _stage_of(run.root, path)
            if owner is None or owner == (stage, tag) or path.name == MANIFEST_NAME:
                continue  # its own folder, run-level files, and manifests read to check freshness
            assert owner in declared, f"{label} opened {path} of {owner}, not among its inputs {sorted(declared)}"
        # and every declared upstream stage was actually used
        used = {_stage_of(run.root, p) for p in finished.opened[label]}
        assert declared <= used, f"{label} declares {declared - used} but never opened them"


def test_requiring_an_undeclared_input_inside_a_stage_fails(finished, tmp_path):
    from stages.core.runner import Produced, execute

    run, _ = _copy(finished, tmp_path)
    plan = StagePlan("eval", "x-pool5-s1", {"k": 1}, {"detect": run.require("detect", "test-ftfc7-s1-bb")},
                     {"out": "out.txt"})

    def body(folder: Path) -> Produced:
        run.require("pretrain")  # not declared
        return Produced({})

    with pytest.raises(SppError, match="did not declare: 'pretrain'"):
        execute(run, plan, body, describe=str)

    def honest(folder: Path) -> Produced:
        run.require("detect", "test-ftfc7-s1-bb")
        (folder / "out.txt").write_text("ok")
        return Produced({"n": 1})

    result = execute(run, plan, honest, describe=lambda m: f"n={m['n']}")
    assert result.summary == "n=1" and result.manifest.data["output_sizes"] == {"out": 2}
    assert execute(run, plan, honest, describe=str).skipped


# -- one registry ---------------------------------------------------------------------------------------------------
def test_makefile_targets_and_commands_come_from_the_registry():
    text = (REPO / "Makefile").read_text()
    folders = set(re.findall(r"\$\(R\)/(\d\d_[a-z]+)/", text))
    assert folders == {info.folder for info in registry.STAGES.values()}
    # each stage folder's rule runs that stage's command
    for info in registry.STAGES.values():
        rules = re.findall(rf"^\$\(R\)/{info.folder}/[^\n]*:(?:[^\n]*\\\n)*[^\n]*\n\t[^\n]*?\$\(SPP\) ([a-z-]+)", text, re.M)
        assert rules and set(rules) == {info.command}, (info.folder, rules)
    assert "N_SCALES := 5" not in text  # the scale count comes from the preset


def test_every_stage_is_a_cli_command_with_its_module():
    import importlib

    for info in registry.STAGES.values():
        assert info.command in cli.commands, info.command
        assert callable(importlib.import_module(f"stages.{info.module}").run)


@pytest.mark.parametrize("stage,tag", [("pretrain", None), ("proposals", "trainval"), ("features", "test+ftconv"),
                                       ("finetune", None), ("svm", "ftfc7-s1"), ("svm", "pool5-s5"),
                                       ("bbox", "s5+ftconv"), ("bbox", "s1"), ("detect", "test_demo-fc7-s1-bb"),
                                       ("eval", "my-split-ftfc6-s5")])
def test_run_first_messages_are_commands_that_parse(stage, tag, tmp_path):
    line = registry.command_line(tmp_path / "runs" / "my run", stage, tag)
    args = __import__("shlex").split(line)
    assert args[:2] == ["spp", registry.STAGES[stage].command]
    command = cli.commands[args[1]]
    ctx = command.make_context(args[1], args[2:])  # parses as the CLI would, or raises
    assert ctx.params["run_name"] == "my run" and ctx.params["runs_root"] == str(tmp_path / "runs")
    if stage in ("svm", "detect", "eval"):
        n = 1 if ctx.params["one_scale"] else 5
        rebuilt = (registry.svm_tag(ctx.params["feature"], ctx.params["one_scale"], n) if stage == "svm" else
                   registry.detect_tag(ctx.params["split"], ctx.params["feature"], ctx.params["one_scale"], n,
                                       ctx.params["bbox"]))
        assert rebuilt == tag


# -- run state that does not stick ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["finetune.iters=-5", "finetune.fg_fraction=1.5", "svm.C=0",
                                 "features.scales=[96, 96]", "detect.nms_iou=0"])
def test_a_rejected_value_is_one_line_and_not_saved(finished, tmp_path, bad):
    run, common = _copy(finished, tmp_path)
    before = (run.root / "config.json").read_bytes()
    out = _invoke("train-bbox", *common, "--one-scale", "--set", bad, expect=1)
    assert out.count("\n") == 1 and bad.split("=")[0] in out
    assert (run.root / "config.json").read_bytes() == before
    assert "up to date" in _invoke("train-bbox", *common, "--one-scale")


def test_range_checks_live_in_the_config_types():
    with pytest.raises(SppError, match="finetune.bg_iou"):
        build_config("synth", {"finetune.bg_iou": [0.1, 0.6], "finetune.fg_iou": 0.5})
    import dataclasses
    cfg = build_config("synth")
    with pytest.raises(SppError, match="svm.pruning"):
        dataclasses.replace(cfg.svm, pruning="nearest")


def test_machine_settings_and_reading_commands_write_nothing(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    saved = json.loads((run.root / "config.json").read_text())
    assert "device" not in saved and "workers" not in saved["svm"] and "workers" not in saved["proposals"]
    before = _snapshot(run.root)
    _invoke("table9", *common, "--device", "cuda")
    _invoke("eval", *common, "--detections", str(run.stage_dir("detect", "test-ftfc7-s1-bb") / "comp4"),
            "--out", str(tmp_path / "elsewhere"))
    _invoke("train-bbox", *common, "--one-scale", "--device", "cuda", "--set", "svm.workers=7")  # up to date
    _invoke("finetune", "--help")
    _invoke("bench", *common, "--backbone", "foo", expect=2)  # refused by the option itself
    assert _snapshot(run.root) == before
    assert "up to date" in _invoke("detect", *common, "--feature", "ftfc7", "--one-scale", "--bbox")


# -- outputs must still be there ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,tag,file,downstream", [
    ("svm", "ftfc7-s1", "svm.npz", ["detect", "--feature", "ftfc7", "--one-scale", "--bbox"]),
    ("bbox", "s1", "bbox.npz", ["detect", "--feature", "ftfc7", "--one-scale", "--bbox"]),
    ("finetune", None, "model.pt", ["train-svm", "--feature", "ftfc7", "--one-scale"]),
    ("pretrain", None, "model.pt", ["finetune"])])
def test_a_deleted_output_makes_its_stage_rerun(finished, tmp_path, stage, tag, file, downstream):
    run, common = _copy(finished, tmp_path)
    (run.stage_dir(stage, tag) / file).unlink()
    (run.stage_dir("detect", "test-ftfc7-s1-bb") / MANIFEST_NAME).unlink()  # so detect rechecks its inputs
    out = _invoke(*downstream, *common, expect=1)
    command = registry.command_line(run.root, stage, tag)
    assert f"lost or changed its output {run.stage_dir(stage, tag) / file} " in out and f"rerun `{command}`" in out
    with pytest.raises(StageInputMissing):
        run.require(stage, tag)
    if stage in ("svm", "bbox"):  # cheap to rerun here: the rerun really runs, and the next stage is content
        out = _invoke(*__import__("shlex").split(command)[1:], "--dataset", "synth",
                      "--voc-root", str(finished.devkit))
        assert "up to date" not in out and (run.stage_dir(stage, tag) / file).exists()
        _invoke(*downstream, *common)


# -- two processes ---------------------------------------------------------------------------------------------------
def test_a_second_process_on_a_stage_stops_with_one_line_naming_the_first(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    (run.stage_dir("bbox", "s1") / MANIFEST_NAME).unlink()
    plan = StagePlan("bbox", "s1", {}, {}, {})
    with stage_lock(run.stage_dir("bbox", "s1"), plan):
        out = _invoke("train-bbox", *common, "--one-scale", expect=1)
    assert out.count("\n") == 1 and f"being run by process {os.getpid()}" in out
    assert "up to date" not in _invoke("train-bbox", *common, "--one-scale")  # free again: it runs


def test_a_lock_left_by_a_killed_process_does_not_block(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    (run.stage_dir("bbox", "s1") / MANIFEST_NAME).unlink()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from stages.core.runner import StagePlan, stage_lock\n"
        f"with stage_lock(Path({str(run.stage_dir('bbox', 's1'))!r}), StagePlan('bbox', 's1', {{}}, {{}}, {{}})):\n"
        "    print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "being run by process" in _invoke("train-bbox", *common, "--one-scale", expect=1)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
    assert (run.stage_dir("bbox", "s1") / ".lock").exists()  # the file stays; the kernel's lock went with the process
    assert "up to date" not in _invoke("train-bbox", *common, "--one-scale")


def test_a_holder_that_has_not_yet_written_its_note_is_still_named(tmp_path, monkeypatch):
    """The lock is taken before the owner note is written: a second process must wait for the note, not guess."""
    plan = StagePlan("bbox", "s1", {}, {}, {})
    monkeypatch.setattr(runner, "OWNER_NOTE_PATIENCE_S", 60.0)  # the note comes after 0.5 s, however busy CI is
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from filelock import FileLock\n"
        f"lock = FileLock({str(tmp_path / '.lock')!r}); lock.acquire(); print('held', flush=True)\n"
        f"time.sleep(0.5); import os, json; open({str(tmp_path / '.lock.owner')!r}, 'w').write("
        "json.dumps({'pid': os.getpid(), 'command': 'spp train-bbox', 'since': 'now'})); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SppError, match=f"being run by process {holder.pid} "):
            with stage_lock(tmp_path, plan):
                pass
        # a holder that never writes one is anonymous, after a short wait; so is one whose note is a dead process's
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        monkeypatch.setattr(runner, "OWNER_NOTE_PATIENCE_S", 0.5)
        for note in [None, {"pid": int(gone.stdout), "command": "spp train-bbox", "since": "then"}]:
            (tmp_path / ".lock.owner").unlink(missing_ok=True)
            if note:
                (tmp_path / ".lock.owner").write_text(json.dumps(note))
            with pytest.raises(SppError, match="being run by another process"):
                with stage_lock(tmp_path, plan):
                    pass
    finally:
        holder.kill()
        holder.wait(30)
    with stage_lock(tmp_path, plan):  # free again; the note is this process's while held, and gone after
        assert json.loads((tmp_path / ".lock.owner").read_text())["pid"] == os.getpid()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock"]  # no note, no half-written one


def test_two_extract_features_processes_meet_safely(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    shutil.rmtree(run.stage_dir("features", "test"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([str(SPP), "extract-features", *common, "--split", "test", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 1]), results  # both fine (one found it done) or one stopped cleanly
    for code, out, err in results:
        assert "Traceback" not in err, err
        if code == 1:
            assert err.count("\n") == 1 and "is being run by process" in err
    manifest = run.require("features", "test")  # the manifest's recorded sizes are the files on disk
    assert not list(run.stage_dir("features", "test").glob("*.corrupt*"))
    assert manifest.data["output_sizes"]["features"] == manifest.output("features").stat().st_size


# -- unusable places ------------------------------------------------------------------------------------------------
def _without_root_powers(args: list[str]) -> subprocess.CompletedProcess:
    drop = "-dac_override,-dac_read_search,-fowner"
    return subprocess.run(["setpriv", "--bounding-set", drop, "--inh-caps", drop, *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root's powers")
def test_a_read_only_run_reports_and_refuses_in_one_line(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    (run.stage_dir("bbox", "s1") / MANIFEST_NAME).unlink()
    subprocess.run(["chmod", "-R", "a-w", str(run.root)], check=True)
    try:
        table = _without_root_powers([str(SPP), "table9", *common])
        assert table.returncode == 0 and "Table 9" in table.stdout, table.stderr
        done = _without_root_powers([str(SPP), "train-svm", *common, "--feature", "ftfc7", "--one-scale"])
        assert done.returncode == 0 and "up to date" in done.stdout, done.stderr
        todo = _without_root_powers([str(SPP), "train-bbox", *common, "--one-scale"])
        assert todo.returncode == 1 and todo.stderr.count("\n") == 1, todo.stderr
        assert "permission denied" in todo.stderr and str(run.stage_dir("bbox", "s1")) in todo.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(run.root)], check=True)


def test_a_runs_root_under_a_regular_file_is_one_line(finished, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = _invoke("proposals", "--run", "x", "--runs-root", str(blocker / "runs"), "--dataset", "synth",
                  "--voc-root", str(finished.devkit), "--split", "test", expect=1)
    assert out.count("\n") == 1 and str(blocker) in out and "regular file" in out


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root's powers")
def test_a_runs_root_in_an_unwritable_folder_is_one_line(finished, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = _without_root_powers([str(SPP), "proposals", "--run", "x", "--runs-root", str(locked / "runs"),
                                   "--dataset", "synth", "--voc-root", str(finished.devkit), "--split", "test"])
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert str(locked) in result.stderr and "permission denied" in result.stderr


def test_config_backbone_names_match_the_networks():
    from stages.core import nets
    from stages.core.config import CHOICES

    assert CHOICES["model.backbone"] == nets.BACKBONES
    with pytest.raises(SppError, match="model.backbone: 'foo' is not one of"):
        build_config("synth", {"model.backbone": "foo"})
    with pytest.raises(SppError, match="model.width: 0.5 applies to zf5 only"):
        build_config("voc2007-mobilenet", {"model.width": 0.5})


def test_a_value_that_fails_inside_a_stage_is_not_saved(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    before = (run.root / "config.json").read_bytes()
    (run.stage_dir("svm", "ftfc7-s1") / MANIFEST_NAME).unlink()
    out = _invoke("train-svm", *common, "--feature", "ftfc7", "--one-scale", "--set", "features.one_scale=777",
                  expect=1)
    assert "777" in out and out.count("\n") == 1
    assert (run.root / "config.json").read_bytes() == before


def test_an_unwritable_output_path_outside_the_run_is_one_line(finished, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _, common = _copy(finished, tmp_path)
    out = _invoke("table9", *common, "--json", str(blocker / "t.json"), expect=1)
    assert out.count("\n") == 1 and str(blocker) in out


def test_hints_in_artifact_readers_are_commands_of_their_run(tmp_path):
    runs = tmp_path / "runs"
    cases = {runs / "r" / "02_features" / "test+ftconv" / "features.h5":
             f"spp extract-features --run r --runs-root {runs} --split test --conv-from finetune",
             runs / "r" / "04_svm" / "ftfc7-s1" / "svm.npz":
             f"spp train-svm --run r --runs-root {runs} --feature ftfc7 --one-scale",
             runs / "r" / "05_bbox" / "s5" / "bbox.npz": f"spp train-bbox --run r --runs-root {runs}",
             runs / "r" / "01_proposals" / "val" / "proposals.h5":
             f"spp proposals --run r --runs-root {runs} --split val",
             runs / "r" / "00_pretrain" / "model.pt": f"spp pretrain --run r --runs-root {runs}"}
    for path, command in cases.items():
        assert registry.command_for_path(path) == command
    from stages.core.svm import load_svm_model
    bad = tmp_path / "runs" / "r" / "04_svm" / "pool5-s1" / "svm.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an npz")
    with pytest.raises(SppError, match=rf"rerun `spp train-svm --run r --runs-root {runs} --feature pool5 --one-scale`"):
        load_svm_model(bad)


def test_a_feature_file_open_in_a_reader_is_never_moved(finished, tmp_path):
    run, common = _copy(finished, tmp_path)
    final = run.stage_dir("features", "test") / "features.h5"
    (run.stage_dir("features", "test") / MANIFEST_NAME).unlink()  # a rerun would reuse the finished file
    with h5py.File(final, "r"):  # a stage reading the maps, as train-svm or detect would
        result = subprocess.run([str(SPP), "extract-features", *common, "--split", "test", "--device", "cpu"],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "open in another process" in result.stderr and str(final) in result.stderr
        assert final.exists() and not list(final.parent.glob("*.corrupt*"))
    assert "up to date" not in _invoke("extract-features", *common, "--split", "test")  # free again: it finishes
