"""``bench/gpu_check.sh``: its options are checked up front, without a CUDA GPU it says so in one line and exits 0,
and a forced CPU run with no budget left still ends in one summary block and its JSON (every part skipped)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OUT", "SPP_GPU_CHECK_DEVICE")}
    environ.update({"PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=environ)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_help_names_the_device_run():
    result = _script("--help")
    assert result.returncode == 0
    for text in ("--prepare", "--budget", "--only", 'carry  [".whl", "data/gpu_check"]', "SPP_GPU_CHECK_DEVICE"):
        assert text in result.stdout


def test_without_a_gpu_it_says_so_and_exits_0():
    result = _script()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU here: nothing to check (")
    # a python without torch is no GPU either
    result = _script(PY="false")
    assert result.returncode == 0 and result.stdout.startswith("no CUDA GPU here: nothing to check")
    assert "cannot import torch" in result.stdout


@pytest.mark.parametrize("args,env,message", [
    (["--bogus"], {}, "unknown option --bogus"),
    (["--budget", "soon"], {}, "--budget needs whole seconds"),
    (["--only", "tests,lunch"], {}, "--only takes tests, bench and/or pipeline"),
    (["--set", "finetune.iters"], {}, "--set needs KEY=VALUE"),
    ([], {"SPP_GPU_CHECK_DEVICE": "tpu"}, "SPP_GPU_CHECK_DEVICE must be cpu"),
])
def test_bad_options_are_one_line(args, env, message):
    result = _script(*args, **env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_a_run_with_no_budget_left_still_writes_its_summary(tmp_path):
    out = tmp_path / "summary.json"
    result = _script("--budget", "0", "--work", str(tmp_path / "work"), "--out", str(out),
                     SPP_GPU_CHECK_DEVICE="cpu")
    assert result.returncode == 3, result.stdout + result.stderr  # 3: nothing failed, the budget stopped it
    assert result.stdout.count("gpu_check summary") == 1 and f"written: {out}" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["status"] == "incomplete (budget)" and summary["device"] == "cpu" and summary["failures"] == []
    names = [part["name"] for part in summary["parts"]]
    # "install" is a part only where wheels were carried (.whl/, made by --prepare): not in a fresh clone.
    expected = ["imports", "pytest -m gpu", "spp bench"]
    assert names[:4] == ["install", *expected] if (REPO / ".whl").is_dir() and any((REPO / ".whl").glob("*.whl")) \
        else names[:3] == expected
    assert all(part["status"] == "skipped (budget spent)" for part in summary["parts"])
    assert not (REPO / "gpu_check.json").exists()
