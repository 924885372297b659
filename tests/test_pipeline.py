"""One end-to-end run of every stage, through the `spp` CLI, on a tiny generated dataset.

The sizes are cut down (few images, tiny scales, narrow fc layers, few iterations) so that the run takes
about a minute on a CPU; the assertions check that each stage wrote what the next one reads, and that the
results are well-formed, not that the tiny detector is good (`make all` measures that).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import cli
from stages import synth
from stages.core.artifacts import Run, read_manifest

TINY = [
    "model.fc_dim=64", "features.scales=[96, 128]", "features.one_scale=128",
    "pretrain.sizes=[64, 80]", "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.workers=0",
    "proposals.max_boxes=80", "proposals.workers=1",
    "finetune.iters=12", "finetune.lr_steps=[8]", "finetune.eval_every=6", "finetune.batch_size=32",
    "finetune.holdout_batches=2",
]


def _spp(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_every_stage_end_to_end(tmp_path: Path):
    devkit = tmp_path / "synth"
    synth.generate(devkit, seed=1, images=12, crops_per_class=6)
    runner = CliRunner()
    common = ["--run", "e2e", "--runs-root", str(tmp_path / "runs"), "--dataset", "synth", "--voc-root", str(devkit),
              "--device", "cpu"]
    sets = [arg for item in TINY for arg in ("--set", item)]
    _spp(runner, "pretrain", *common, "--config", "synth", *sets)
    for split in ("trainval", "test"):
        out = _spp(runner, "proposals", *common, "--split", split)
        assert "recall" in out.lower()
        _spp(runner, "extract-features", *common, "--split", split)
    _spp(runner, "finetune", *common)
    for feature in ("pool5", "ftfc7"):
        _spp(runner, "train-svm", *common, "--feature", feature)
    _spp(runner, "train-bbox", *common)
    _spp(runner, "detect", *common, "--feature", "ftfc7", "--bbox")
    out = _spp(runner, "eval", *common, "--feature", "ftfc7", "--bbox")
    assert "mAP" in out
    # Beyond the paper: the fine-tuned fc8's softmax scores the windows, no SVMs; its detections are probabilities.
    _spp(runner, "detect", *common, "--feature", "softmax", "--bbox")
    assert "mAP" in _spp(runner, "eval", *common, "--feature", "softmax", "--bbox")
    softmax = np.load(Run(tmp_path / "runs" / "e2e").stage_dir("detect", "test-softmax-s2-bb") / "detections.npz")
    assert len(softmax["score"]) and ((softmax["score"] > 0) & (softmax["score"] <= 1)).all()
    assert "svm" not in read_manifest(Run(tmp_path / "runs" / "e2e").manifest_path(
        "detect", "test-softmax-s2-bb")).data["inputs"]
    table = _spp(runner, "table9", *common)
    assert "\nsoftmax bb " in table and "\nsoftmax   " not in table  # only the evaluated extra row is shown
    result = runner.invoke(cli, ["train-svm", *common, "--feature", "softmax"])
    assert result.exit_code == 2 and "'softmax' is not one of" in result.output  # SVMs never train on it

    run = Run(tmp_path / "runs" / "e2e")
    for stage, tag in [("pretrain", None), ("proposals", "test"), ("features", "trainval"), ("finetune", None),
                       ("svm", "ftfc7-s2"), ("bbox", "s2"), ("detect", "test-ftfc7-s2-bb"),
                       ("eval", "test-ftfc7-s2-bb")]:
        assert run.require(stage, tag)  # present and fresh
    metrics = json.loads((run.stage_dir("eval", "test-ftfc7-s2-bb") / "metrics.json").read_text())
    classes = (devkit / "VOC2007" / "classes.txt").read_text().split()
    assert set(metrics["ap"]) == set(classes)
    assert all(0.0 <= ap <= 1.0 for ap in metrics["ap"].values())
    assert metrics["mAP"] == pytest.approx(np.mean(list(metrics["ap"].values())))
    comp4 = read_manifest(run.manifest_path("detect", "test-ftfc7-s2-bb")).output("comp4_dir")
    assert sorted(p.name for p in comp4.iterdir()) == sorted(f"comp4_det_test_{c}.txt" for c in classes)

    # detect.fc_dtype=bfloat16 reruns detect (a config change) and keeps the float32 detections: same kept windows
    # but for near-ties, scores within 1e-2 of the float32 ones.
    float32 = dict(np.load(run.stage_dir("detect", "test-ftfc7-s2-bb") / "detections.npz"))
    out = _spp(runner, "detect", *common, "--feature", "ftfc7", "--bbox", "--set", "detect.fc_dtype=bfloat16")
    assert "up to date" not in out
    bf16 = np.load(run.stage_dir("detect", "test-ftfc7-s2-bb") / "detections.npz")
    keys = {(i, k, *np.round(b, 2)): s for i, k, s, b in zip(float32["image_index"], float32["label"],
                                                              float32["score"], float32["boxes"])}
    matched = [(keys[(i, k, *np.round(b, 2))], s) for i, k, s, b in zip(bf16["image_index"], bf16["label"],
                                                                        bf16["score"], bf16["boxes"])
               if (i, k, *np.round(b, 2)) in keys]
    assert len(matched) >= 0.9 * len(keys) > 0
    assert np.abs(np.subtract(*np.array(matched).T)).max() < 1e-2
    result = runner.invoke(cli, ["detect", *common, "--feature", "ftfc7", "--set", "detect.fc_dtype=float16"])
    assert result.exit_code == 1 and "detect.fc_dtype: 'float16' is not one of float32, bfloat16" in result.output
    # The bad value is refused before it is saved: the run's config still says bfloat16.
    assert json.loads((run.root / "config.json").read_text())["detect"]["fc_dtype"] == "bfloat16"
    # The run keeps its config: float32 again for what follows.
    _spp(runner, "detect", *common, "--feature", "ftfc7", "--bbox", "--set", "detect.fc_dtype=float32")

    # A second run of a finished stage is skipped, and a changed upstream makes it stale with a clear message.
    assert "up to date" in _spp(runner, "train-bbox", *common)
    result = runner.invoke(cli, ["finetune", *common, "--set", "finetune.iters=13"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["detect", *common, "--feature", "ftfc7", "--bbox"])
    assert result.exit_code == 1 and "stale input" in result.output and "\n" == result.output[-1]

    # --conv (beyond the paper): ftfc7 of a model whose conv layers were fine-tuned too is computed from conv5 maps
    # of those conv layers (a cache of their own), and its box regressors from their pool5; pool5 / fc7 keep the
    # pretrained maps.
    _spp(runner, "finetune", *common, "--conv", "--set", "finetune.iters=4", "--set", "finetune.lr_steps=[3]",
         "--set", "finetune.eval_every=2")
    result = runner.invoke(cli, ["train-svm", *common, "--feature", "ftfc7"])
    assert result.exit_code == 1 and (f"run `spp extract-features --run e2e --runs-root {tmp_path / 'runs'} --split trainval "
                                      "--conv-from finetune`") in result.output
    for split in ("trainval", "test"):
        _spp(runner, "extract-features", *common, "--split", split, "--conv-from", "finetune")
    _spp(runner, "train-svm", *common, "--feature", "ftfc7")
    result = runner.invoke(cli, ["detect", *common, "--feature", "ftfc7", "--bbox"])
    assert result.exit_code == 1 and (f"run `spp train-bbox --run e2e --runs-root {tmp_path / 'runs'} --conv-from "
                                      "finetune` first") in result.output
    _spp(runner, "train-bbox", *common, "--conv-from", "finetune")
    _spp(runner, "detect", *common, "--feature", "ftfc7", "--bbox")
    inputs = run.require("detect", "test-ftfc7-s2-bb").data["inputs"]
    assert inputs["features"]["manifest"] == "02_features/test+ftconv/MANIFEST.json"
    assert inputs["bbox"]["manifest"] == "05_bbox/s2+ftconv/MANIFEST.json"
    assert run.require("svm", "ftfc7-s2").data["inputs"]["features"]["manifest"] == (
        "02_features/trainval+ftconv/MANIFEST.json")
    assert "up to date" in _spp(runner, "train-svm", *common, "--feature", "pool5")  # still the pretrained maps
    assert "up to date" in _spp(runner, "train-bbox", *common)

    # detect on arbitrary image files draws the boxes
    image = devkit / "VOC2007" / "JPEGImages" / f"{synth_test_id(devkit)}.jpg"
    out = _spp(runner, "detect", *common, "--feature", "pool5", "--no-bbox", "--images", str(image),
               "--out", str(tmp_path / "drawn"))
    assert (tmp_path / "drawn" / f"{image.stem}_detections.jpg").stat().st_size > 0, out


def synth_test_id(devkit: Path) -> str:
    return (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
