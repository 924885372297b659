"""bench/detection_errors.py: each top detection sorted into correct / localisation / other class / background,
per class, on hand-placed detections whose kind is known."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import write_devkit
from stages.core.voc import VocDataset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "detection_errors.py"


def _module():
    spec = importlib.util.spec_from_file_location("detection_errors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    pixels = np.zeros((100, 100, 3), np.uint8)
    # Two cats, sppnet boxes [0, 0, 40, 40] and [0, 60, 40, 100], and a dog [60, 60, 100, 100] (1-based inclusive
    # in the devkit).
    devkit = write_devkit(tmp_path / "devkit", {"a": (pixels, [("cat", (1, 1, 40, 40), False),
                                                              ("cat", (1, 61, 40, 100), False),
                                                              ("dog", (61, 61, 100, 100), False)])},
                          {"test": ["a"]}, classes=("cat", "dog"))
    run = tmp_path / "run"
    folder = run / "06_detect" / "test-x"
    folder.mkdir(parents=True)
    detections = [  # (class, score, box)
        (0, 4.0, [0, 0, 40, 40]),      # on a cat: correct
        (0, 3.0, [0, 60, 12, 100]),    # on 30% of the other cat: localisation
        (0, 2.0, [60, 60, 100, 100]),  # on the dog: other class
        (0, 1.0, [45, 0, 55, 10]),     # on nothing: background
        (0, 0.5, [0, 60, 40, 100]),    # right, but past the 2 x 2 top cat detections: not counted
        (1, 5.0, [0, 0, 40, 40]),      # dog on a cat: other class
        (1, 0.1, [60, 60, 100, 100])]  # on the dog: correct
    np.savez(folder / "detections.npz", image_ids=np.array(["a"]), classes=np.array(["cat", "dog"]),
             image_index=np.zeros(len(detections), np.int64), label=np.array([d[0] for d in detections]),
             score=np.array([d[1] for d in detections]), boxes=np.array([d[2] for d in detections], np.float64))
    return devkit, run


def test_each_top_detection_lands_in_its_kind(tmp_path):
    devkit, run = _setup(tmp_path)
    per_class = _module().breakdown(VocDataset(devkit), run / "06_detect" / "test-x" / "detections.npz")
    assert dict(per_class["cat"]) == {"correct": 1, "localisation": 1, "other class": 1, "background": 1}
    assert dict(per_class["dog"]) == {"other class": 1, "correct": 1}


def test_the_script_prints_per_class_lines_and_writes_json(tmp_path):
    devkit, run = _setup(tmp_path)
    out = tmp_path / "errors.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "test-x", "--voc-root", str(devkit),
                           "--per-class", "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "test-x: 6 detections: correct 33%, localisation 17%, other class 33%, background 17%"
    assert lines[1].split()[:3] == ["cat", "4", "correct"] and lines[2].split()[:3] == ["dog", "2", "correct"]
    assert json.loads(out.read_text())["test-x"]["dog"] == {"correct": 1, "localisation": 0, "other class": 1,
                                                            "background": 0}
