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


def _refusal(*args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_bad_arguments_are_one_line(tmp_path):
    common = ("--split", "test", "--work", str(tmp_path / "w"))
    assert "expected svd:R6,R7 with two integers" in _refusal(str(tmp_path), *common, "--variant", "svd:8")
    assert "svd ranks must be positive" in _refusal(str(tmp_path), *common, "--variant", "svd:0,4")
    assert "expected svd:R6,R7 with two integers" in _refusal(str(tmp_path), *common, "--variant", "svd:")
    assert "expected none, int8, svd" in _refusal(str(tmp_path), *common, "--variant", "int8:4,4")
    assert "not a run directory" in _refusal(str(tmp_path), *common, "--variant", "int8")
    (tmp_path / "config.json").write_text("{}")
    assert "must lie outside the run" in _refusal(str(tmp_path), "--split", "test", "--variant", "int8",
                                                  "--work", str(tmp_path / "scratch"))
    assert "must lie outside the run" in _refusal(str(tmp_path), "--split", "test", "--variant", "int8",
                                                  "--work", str(tmp_path.parent))


def test_a_folder_it_did_not_make_is_never_deleted(tmp_path):
    run, work = tmp_path / "run", tmp_path / "work"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (work / "exact").mkdir(parents=True)
    (work / "exact" / "keep.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--split", "test", "--variant", "int8",
                           "--work", str(work)], capture_output=True, text=True)
    assert done.returncode == 1 and "was not made by this script" in done.stderr
    assert (work / "exact" / "keep.txt").read_text() == "mine"
