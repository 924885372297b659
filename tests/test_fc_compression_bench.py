"""bench/fc_compression.py: every variant detected and evaluated in a scratch run of its own, with the run's SVMs
as they are and with SVMs retrained on the compressed features; the source run is never written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stages import train_svm
from stages.core.artifacts import read_manifest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fc_compression.py"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_rows_as_is_and_retrained_leave_the_source_run_alone(tmp_path):
    from test_train_svm import build_tiny_run

    cfg, _ = build_tiny_run(tmp_path, **{"detect.bbox": False})
    source_svm = train_svm.run(cfg, "ftfc7", one_scale=True).manifest
    run = Path(cfg.run_dir)
    before = _tree(run)
    out = tmp_path / "fc.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--split", "trainval", "--feature", "ftfc7",
                           "--one-scale", "--no-bbox", "--variant", "int8", "--variant", "svd:8,4",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tree(run) == before  # nothing of the source run was written
    rows = json.loads(out.read_text())["rows"]
    assert [(r["compression"], r["svms"]) for r in rows] == [
        ("none", "as is"), ("int8", "as is"), ("int8", "retrained"), ("svd", "as is"), ("svd", "retrained")]
    assert rows[0]["mAP_change"] == 0 and rows[3]["svd_ranks"] == [8, 4]
    for row in rows:
        assert 0 <= row["mAP"] <= 1 and row["fc_s_per_image"] > 0 and row["tag"] == "trainval-ftfc7-s1"
        svm = read_manifest(Path(row["run"]) / "04_svm" / "ftfc7-s1" / "MANIFEST.json")
        detect = read_manifest(Path(row["run"]) / "06_detect" / row["tag"] / "MANIFEST.json")
        if row["svms"] == "as is":  # the source run's SVMs, trained on exact features
            assert svm.fingerprint == source_svm.fingerprint
        else:
            assert svm.data["config"]["fc_compression"] == row["compression"]
        assert detect.data["inputs"]["svm"]["fingerprint"] == svm.fingerprint
        assert detect.data["config"]["detect"].get("fc_compression", "none") == row["compression"]
    assert "fc compression on r, trainval-ftfc7-s1" in done.stdout


def test_bad_arguments_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--split", "test", "--variant", "svd:8",
                           "--work", str(tmp_path / "w")], capture_output=True, text=True)
    assert done.returncode == 2 and "expected svd:R6,R7 with two integers" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--split", "test", "--variant", "int8",
                           "--work", str(tmp_path / "w")], capture_output=True, text=True)
    assert done.returncode == 2 and "not a run directory" in done.stderr
