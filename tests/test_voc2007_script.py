"""``bench/voc2007.sh``: its options are checked before any stage runs, and ``--budget cpu`` names one preset."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stages.core.config import build_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "voc2007.sh"


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_cpu_budget_is_one_named_preset():
    cfg = build_config("voc2007-cpu")
    assert (cfg.data.train_split, cfg.data.test_split) == ("train", "val")
    assert cfg.model.backbone == "mobilenet_v2_c18" and cfg.pretrain.epochs == 0
    assert cfg.features.scales == (cfg.features.one_scale,)  # one scale
    text = SCRIPT.read_text()
    assert "voc2007-cpu" in text and "--budget" in _script("--help").stdout


@pytest.mark.parametrize("args,message", [
    (["--budget", "laptop"], "--budget must be cpu or gpu"),
    (["--budget", "cpu", "--backbone", "zf5"], "--budget cpu is the MobileNetV2 recipe"),
])
def test_bad_options_stop_before_any_stage(tmp_path, args, message):
    (tmp_path / "VOC2007").mkdir()
    result = _script(str(tmp_path), "--runs-root", str(tmp_path / "runs"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_every_table9_row_has_its_stages():
    text = SCRIPT.read_text()
    for row in ("pool5", "fc7", "ftfc7", "ftfc7-bb", "softmax", "softmax-bb"):
        assert f"want {row}" in text
    assert "table9" in text and "table9.png" in text
