"""The `spp` CLI as a person meets it: log levels (-v/-q), progress bars only where they can be drawn, Python
warnings as one line, --help that shows every default and environment variable, one meaning per option name,
and runs that save absolute paths so that they continue from any working directory."""
from __future__ import annotations

import ast
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import cli
from stages import bench, report
from stages.core import logs
from stages.core.runconfig import resolve_config

REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 1000


def _invoke(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


SEEN: dict = {}


def _fake_table9(cfg, json_out=None):
    """Stands in for `spp table9`'s work: one line at each log level, a warning of ours and one of a library."""
    SEEN["progress"] = logs.progress_enabled()
    log = logging.getLogger("stages.report")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("ours, over\ntwo lines", UserWarning, stacklevel=1)
        from sklearn.svm import LinearSVC

        rng = np.random.default_rng(0)
        LinearSVC(max_iter=1, dual=True).fit(rng.normal(size=(40, 5)), np.arange(40) % 2)  # ConvergenceWarning
    return "THE TABLE"


# -- logs -----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_table9(monkeypatch):
    monkeypatch.setattr(report, "table9", _fake_table9)


def test_log_levels_quiet_and_verbose(fake_table9, tmp_path):
    common = ["table9", "--run", "r", "--runs-root", tmp_path]
    handlers, showwarning = list(logging.getLogger().handlers), warnings.showwarning

    plain = _invoke(*common)
    assert plain.stdout == "THE TABLE\n"  # the result alone on stdout
    err = plain.stderr.splitlines()
    assert "an info line" in err and "warning: a warning line" in err
    assert not any(line.startswith("debug:") for line in err)

    quiet = _invoke("-q", *common)
    assert quiet.stdout == "THE TABLE\n"
    assert "an info line" not in quiet.stderr and "warning: a warning line" in quiet.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines())

    verbose = _invoke("-v", *common).stderr.splitlines()
    assert "debug: [stages.report] a debug line" in verbose and "an info line" in verbose
    assert any(line.startswith("debug: [stages.core.runconfig] run ") for line in verbose)  # where the config came from

    both = _invoke("-v", "-q", *common, expect=2)
    assert "-v and -q cannot go together" in both.output
    # nothing sticks once the command is over (a library user's logging and warnings are theirs)
    assert logging.getLogger().handlers == handlers and warnings.showwarning is showwarning


def test_a_python_warning_is_one_plain_line(fake_table9, tmp_path):
    result = _invoke("table9", "--run", "r", "--runs-root", tmp_path)
    lines = result.stderr.splitlines()
    assert "warning: ours, over two lines" in lines  # our warnings.warn, its newline folded
    assert any(re.fullmatch(r"warning: Liblinear failed to converge.*", line) for line in lines), lines  # sklearn's
    for line in lines:  # no "file.py:12: UserWarning:" header and no source line under it
        assert not re.search(r"\.py:\d+", line) and "warnings.warn" not in line and "UserWarning" not in line


def test_logs_stay_off_for_library_use(caplog):
    # Without the CLI nothing is configured: no handler of ours, no forced bars, Python's warning display.
    assert not any(isinstance(h, logs._StderrHandler) for h in logging.getLogger().handlers)
    assert logs._forced_progress is None and warnings.showwarning is not logs._show_warning


# -- progress bars ----------------------------------------------------------------------------------------------
def _spp(args: list[str], cwd: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != logs.PROGRESS_ENV}
    environ.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "sppcli", *args], cwd=cwd, env=environ, text=True, timeout=300,
                          **kwargs)


def _proposals_args(devkit: Path, runs: Path, run: str, split: str = "train") -> list[str]:
    return ["proposals", "--run", run, "--runs-root", str(runs), "--dataset", "synth", "--voc-root", str(devkit),
            "--split", split, "--device", "cpu", "--set", "proposals.workers=1"]


def test_progress_bars_only_on_a_terminal_or_when_asked(tiny_devkit, tmp_path):
    runs = tmp_path / "runs"
    piped = _spp(_proposals_args(tiny_devkit, runs, "a"), tmp_path, capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "%|" not in piped.stderr, piped.stderr  # stderr is a pipe: no bar
    assert piped.stdout.startswith("proposals train: 2 images")

    # Asked for on a pipe (a log file): plain lines, no carriage returns, short. A bad image is skipped with one
    # `warning:` line (stages' warnings.warn), which the bar does not garble.
    (tiny_devkit / "VOC2007" / "JPEGImages" / "img1.jpg").write_bytes(b"not a jpeg")
    asked = _spp([*_proposals_args(tiny_devkit, runs, "b"), "--set", "data.skip_bad=true"], tmp_path,
                 env={logs.PROGRESS_ENV: "1"}, capture_output=True)
    assert asked.returncode == 0, asked.stderr
    lines = asked.stderr.splitlines()
    assert "\r" not in asked.stderr and all(len(line) <= MAX_LINE for line in lines), asked.stderr
    assert any(line.startswith("proposals train: 100%") and "2/2" in line for line in lines), lines
    skipped = [line for line in lines if line.startswith("warning:")]
    assert len(skipped) == 1 and "skipping:" in skipped[0] and "img1.jpg" in skipped[0], lines
    assert not any(".py:" in line for line in lines)



@pytest.mark.parametrize("args, env, shown", [
    ([], None, False),  # CliRunner's stderr is no terminal
    ([], "1", True), ([], "0", False), (["--progress"], None, True), (["--no-progress"], "1", False),
    (["-q"], None, False), (["-q"], "1", False), (["-q", "--progress"], None, True)])
def test_progress_switches(fake_table9, tmp_path, monkeypatch, args, env, shown):
    if env is None:
        monkeypatch.delenv(logs.PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.PROGRESS_ENV, env)
    SEEN.clear()
    _invoke(*args, "table9", "--run", "r", "--runs-root", tmp_path)
    assert SEEN["progress"] is shown


def test_a_terminal_gets_a_redrawn_bar(tiny_devkit, tmp_path):
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sppcli", *_proposals_args(tiny_devkit, tmp_path, "t")],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=slave,
                                env={**{k: v for k, v in os.environ.items() if k != logs.PROGRESS_ENV},
                                     "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        os.close(slave)
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
    text = seen.decode(errors="replace")
    assert "\r" in text and "proposals train" in text and "2/2" in text, text


def test_progress_helper_on_a_log_file(monkeypatch):
    import io

    monkeypatch.delenv(logs.PROGRESS_ENV, raising=False)
    bar = logs.progress(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]  # pytest's stderr is no terminal: silent, still iterates
    monkeypatch.setenv(logs.PROGRESS_ENV, "1")
    assert logs.progress(range(3), disable=True).disable  # a caller's own "not here" (e.g. a torchrun rank)
    log_file = io.StringIO()
    assert list(logs.progress(range(500), desc="work", file=log_file)) == list(range(500))
    lines = log_file.getvalue().splitlines()
    assert "\r" not in log_file.getvalue() and 2 <= len(lines) <= 3 and lines[-1].startswith("work: 100%")
    assert all(len(line) <= 160 for line in lines)


# -- --help -------------------------------------------------------------------------------------------------------
def _commands(group: click.Group = cli, ctx: click.Context | None = None, path: str = "spp"):
    """(path, command, context) of every command under ``group``, contexts chained as when the CLI runs."""
    ctx = ctx or click.Context(group, info_name="spp", **group.context_settings)
    for name, command in sorted(group.commands.items()):
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            yield from _commands(command, sub, f"{path} {name}")
        else:
            yield f"{path} {name}", command, sub


# Options that are optional inputs or outputs: absent means "not used", there is no default to show.
NO_DEFAULT = {"--out", "--json", "--detections", "--comp4", "--images"}


def _options(ctx: click.Context):
    return [p for p in ctx.command.params if isinstance(p, click.Option) and not p.hidden]


def test_every_option_has_help_and_shows_its_default():
    root = click.Context(cli, info_name="spp", **cli.context_settings)
    checked = 0
    for path, command, ctx in [("spp", cli, root), *_commands()]:
        assert command.help or command.callback.__doc__, path
        for option in _options(ctx):
            name = max(option.opts, key=len)
            record = option.get_help_record(ctx)
            assert option.help and record, f"{path} {name} has no help text"
            default = option.get_default(ctx, call=False)
            flag_off = option.is_flag and not option.secondary_opts and default is not True
            if flag_off or option.count or option.multiple or option.required or name in ("--help", "--version"):
                continue
            if default is None and name in NO_DEFAULT and not option.show_default:
                continue
            checked += 1
            assert "[default: " in record[1], f"{path} {name}: no default shown in {record[1]!r}"
            assert "[default: (" not in record[1], f"{path} {name}: {record[1]!r}"  # not click's "(text)"
    assert checked > 60
    # the run options every stage shares, as the user reads them
    text = _invoke("finetune", "--help").output
    for shown in ("[default: data/runs]", "[default: default]", "--iters INTEGER", "finetune.iters: the run's saved"):
        assert shown in " ".join(text.split()), shown


def test_no_option_name_means_two_kinds_of_value():
    kinds: dict[str, dict[str, str]] = {}
    for path, _command, ctx in _commands():
        for option in _options(ctx):
            kind = f"{type(option.type).__name__}{'[]' if option.multiple else ''}{' flag' if option.is_flag else ''}"
            for opt in option.opts + option.secondary_opts:
                kinds.setdefault(opt, {})[path] = kind
    mixed = {opt: where for opt, where in kinds.items() if len(set(where.values())) > 1}
    assert not mixed, mixed
    assert kinds["--num-images"] == {"spp bench": "IntParamType", "spp data synth": "IntParamType"}
    assert set(kinds["--images"]) == {"spp detect"}


def test_the_old_images_count_still_works_for_bench(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda cfg, **kwargs: seen.update(kwargs) or "report")
    result = _invoke("bench", "--runs-root", tmp_path, "--images", "2")
    assert seen["n_images"] == 2 and "--num-images" in result.stderr
    _invoke("bench", "--runs-root", tmp_path, "--num-images", "4")
    assert seen["n_images"] == 4


def _environment_variables() -> set[str]:
    """Every name our code reads from the environment: os.environ.get(X) / os.environ[X] / os.getenv(X), with X a
    string or a module-level constant naming one."""
    constants, reads = {}, []
    for path in [*REPO.glob("sppcli/**/*.py"), *REPO.glob("stages/**/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                    isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value.value
            arg = None
            if isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                    arg = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                arg = node.slice
            if arg is not None:
                reads.append(arg)
    names = set()
    for arg in reads:
        if isinstance(arg, ast.Constant):
            names.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in constants:
            names.add(constants[arg.id])
        else:
            raise AssertionError(f"cannot tell which variable {ast.unparse(arg)} names")
    return names


def test_every_environment_variable_and_shell_completion_are_in_the_help():
    names = _environment_variables()
    assert {"SPP_VOC_ROOT", "SPP_PROGRESS", "SPP_DISK_MARGIN_MB", "WORLD_SIZE"} <= names
    text = _invoke("--help").output
    for name in names:
        assert name in text, f"{name} is read but not in `spp --help`"
    for shell in ("bash_source", "zsh_source", "fish_source"):
        assert f"_SPP_COMPLETE={shell} spp" in text


# -- paths ----------------------------------------------------------------------------------------------------
def test_a_run_saves_absolute_paths_and_continues_from_another_folder(tiny_devkit, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "devkit").symlink_to(tiny_devkit)
    monkeypatch.chdir(home)
    # relative paths everywhere, the runs root by default (data/runs of the working directory)
    out = _invoke("proposals", "--run", "r", "--dataset", "synth", "--voc-root", "devkit", "--split", "train",
                  "--device", "cpu", "--set", "proposals.workers=1", "--set", "model.weights=w/trunk.pt",
                  "--set", "pretrain.data=crops", "--set", "pretrain.init=~/init.pt").stdout
    assert out.startswith("proposals train: 2 images")
    saved = json.loads((home / "data" / "runs" / "r" / "config.json").read_text())
    assert saved["runs_root"] == str(home / "data" / "runs") and saved["run"] == "r"
    assert saved["data"]["voc_root"] == str(home / "devkit")  # absolute, the link kept as named
    assert saved["model"]["weights"] == str(home / "w" / "trunk.pt")
    assert saved["pretrain"]["data"] == str(home / "crops")
    assert saved["pretrain"]["init"] == os.path.expanduser("~/init.pt")

    # From another folder: the run is found through its runs root; what it saved needs no working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    later = _spp(["proposals", "--run", "r", "--runs-root", os.path.relpath(home / "data" / "runs", elsewhere),
                  "--split", "test", "--device", "cpu"], elsewhere, capture_output=True)
    assert later.returncode == 0, later.stderr
    assert later.stdout.startswith("proposals test: 1 images")
    monkeypatch.chdir(elsewhere)
    again = _invoke("proposals", "--run", "r", "--runs-root", home / "data" / "runs", "--split", "train")
    assert again.stdout.startswith("up to date: ")
    assert not (elsewhere / "data").exists()  # nothing made relative to this folder


def test_defaults_are_resolved_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPP_VOC_ROOT", raising=False)
    cfg = resolve_config(None, {}, [])
    assert cfg.runs_root == str(tmp_path / "data" / "runs") and cfg.data.voc_root == str(tmp_path / "data" / "synth")
    assert resolve_config(None, {"data.dataset": "voc2007"}).data.voc_root == str(tmp_path / "data" / "VOCdevkit")
    monkeypatch.setenv("SPP_VOC_ROOT", "voc")
    assert resolve_config(None, {"data.dataset": "voc2007"}).data.voc_root == str(tmp_path / "voc")
    named = "MobileNet_V2_Weights.IMAGENET1K_V1"  # torchvision's weights by name: not a path
    assert resolve_config(None, {"model.weights": named}).model.weights == named


def test_a_moved_run_is_the_run_where_it_is_now(tmp_path, monkeypatch):
    old = tmp_path / "old" / "r"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"run": "r", "runs_root": str(tmp_path / "old"),
                                                 "data": {"voc_root": "rel/devkit"}}))
    (tmp_path / "new").mkdir()
    old.rename(tmp_path / "new" / "r")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(None, {"run": "r", "runs_root": "new"})
    assert cfg.run_dir == tmp_path / "new" / "r"  # not the runs root its config.json recorded
    assert cfg.data.voc_root == str(tmp_path / "rel" / "devkit")  # an older relative path: from here, as before
