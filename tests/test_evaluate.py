"""``spp eval``: comp4 folders and the run's own detections -> metrics.json, PR plot, manifest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import cli
from stages import evaluate
from stages.core.artifacts import Run, read_manifest
from stages.core.config import build_config
from stages.core.errors import InputError, SppError, StageInputMissing
from stages.core.registry import detect_tag
from stages.core.voc import VOC_CLASSES, Annotation, annotation_xml, voc_to_boxes, write_comp4

# image id -> [(class, (xmin, ymin, xmax, ymax) devkit, difficult)]
OBJECTS = {
    "000001": [("dog", (1, 1, 10, 10), False), ("cat", (20, 20, 40, 40), False)],
    "000002": [("dog", (5, 5, 30, 30), True), ("dog", (40, 40, 60, 60), False)],
    "000003": [],
}
# dog: TP, ignored (difficult), FP, TP -> rec .5 .5 .5 1, prec 1 1 .5 2/3
DOG_AP_VOC07 = (6 * 1 + 5 * 2 / 3) / 11  # t = 0 .. 0.5 see 1, t = 0.6 .. 1 see 2/3
DOG_AP_AREA = 0.5 * 1 + 0.5 * 2 / 3
EXPECTED_MAP = (DOG_AP_VOC07 + 1.0) / 20  # cat AP 1, the 18 other VOC classes AP 0


def write_voc_devkit(root: Path, objects=OBJECTS, split="test") -> Path:
    """Annotations and a split list only (evaluation needs no pixels); VOC's 20 classes."""
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objs in objects.items():
        ann = Annotation(image_id, 100, 80, voc_to_boxes(np.array([b for _, b, _ in objs], dtype=float)),
                         np.array([VOC_CLASSES.index(c) for c, _, _ in objs], dtype=np.int64),
                         np.array([d for _, _, d in objs], dtype=bool))
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(annotation_xml(ann, VOC_CLASSES))
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in objects))
    return root


def write_detections(folder: Path, split="test", extra_dog=()) -> Path:
    def dets(rows):
        return [(i, s, voc_to_boxes(np.array([b], dtype=float))[0]) for i, s, b in rows]

    write_comp4(folder, split, "dog", dets([("000001", 0.9, (1, 1, 10, 10)), ("000002", 0.8, (5, 5, 30, 30)),
                                             ("000002", 0.7, (70, 60, 90, 75)), ("000002", 0.6, (40, 40, 60, 60)),
                                             *extra_dog]))
    write_comp4(folder, split, "cat", dets([("000001", 0.5, (20, 20, 40, 40))]))
    write_comp4(folder, split, "unicorn", dets([("000003", 0.5, (1, 1, 5, 5))]))  # not a class: ignored
    return folder


@pytest.fixture
def devkit(tmp_path):
    return write_voc_devkit(tmp_path / "VOCdevkit")


@pytest.fixture
def no_plot(monkeypatch):
    """Skip matplotlib (about a second per call) where the test is not about the plot."""
    monkeypatch.setattr(evaluate, "_pr_plot", lambda result, split, metric: b"\x89PNG stub")


def _cfg(tmp_path, devkit, **more):
    return build_config(overrides={"data.dataset": "voc2007", "data.voc_root": str(devkit),
                                   "runs_root": str(tmp_path / "runs"), "run": "r", **more})


def _eval_cli(tmp_path, devkit, dets, out, *more):
    return CliRunner().invoke(cli, ["eval", "--dataset", "voc2007", "--voc-root", str(devkit), "--split", "test",
                                    "--detections", str(dets), "--out", str(out),
                                    "--runs-root", str(tmp_path / "runs"), *more])


def test_cli_eval_of_a_detections_folder(tmp_path, devkit, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dets, out = write_detections(tmp_path / "dets"), tmp_path / "out"
    result = _eval_cli(tmp_path, devkit, dets, out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(EXPECTED_MAP, abs=1e-12)
    assert metrics["ap"]["dog"] == pytest.approx(DOG_AP_VOC07, abs=1e-12)
    assert metrics["ap"]["cat"] == pytest.approx(1.0, abs=1e-15) and metrics["ap"]["person"] == 0.0
    assert list(metrics["ap"]) == list(VOC_CLASSES) and "unicorn" not in metrics["ap"]
    assert metrics["npos"]["dog"] == 2 and metrics["npos"]["cat"] == 1
    assert (metrics["metric"], metrics["split"], metrics["num_images"]) == ("voc07", "test", 3)
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(out / "MANIFEST.json")
    assert manifest.metrics["mAP"] == metrics["mAP"] and manifest.output("metrics") == out / "metrics.json"
    assert "dog" in result.output and f"{EXPECTED_MAP * 100:.2f}" in result.output  # the per-class table

    # same inputs: skipped; a changed detections file: recomputed
    again = _eval_cli(tmp_path, devkit, dets, out)
    assert again.exit_code == 0 and "up to date" in again.output
    write_detections(dets, extra_dog=[("000003", 0.95, (1, 1, 10, 10))])  # a top-scoring FP
    changed = _eval_cli(tmp_path, devkit, dets, out)
    assert changed.exit_code == 0 and "up to date" not in changed.output
    assert json.loads((out / "metrics.json").read_text())["ap"]["dog"] < DOG_AP_VOC07

    area = _eval_cli(tmp_path, devkit, dets, tmp_path / "out_area", "--metric", "area")
    assert area.exit_code == 0, area.output
    assert json.loads((tmp_path / "out_area" / "metrics.json").read_text())["metric"] == "area"


def test_area_metric(tmp_path, devkit, no_plot):
    cfg = _cfg(tmp_path, devkit)
    result = evaluate.evaluate_folder(cfg, "test", write_detections(tmp_path / "dets"), tmp_path / "out",
                                      metric="area")
    assert result.manifest.metrics["ap"]["dog"] == pytest.approx(DOG_AP_AREA, abs=1e-12)


def test_detection_outside_the_split_is_a_one_line_error(tmp_path, devkit, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dets = write_detections(tmp_path / "dets", extra_dog=[("009999", 0.1, (1, 1, 5, 5))])
    result = _eval_cli(tmp_path, devkit, dets, tmp_path / "out")
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "comp4_det_test_dog.txt" in message and "009999" in message
    assert not (tmp_path / "out" / "MANIFEST.json").exists()


def test_bad_annotation_is_an_error_or_skipped(tmp_path, devkit, no_plot):
    (devkit / "VOC2007" / "Annotations" / "000003.xml").write_text("<annotation><size>")
    dets = write_detections(tmp_path / "dets")
    with pytest.raises(InputError, match="000003.xml"):
        evaluate.evaluate_folder(_cfg(tmp_path, devkit), "test", dets, tmp_path / "out")
    with pytest.warns(UserWarning, match="000003"):
        result = evaluate.evaluate_folder(_cfg(tmp_path, devkit, **{"data.skip_bad": True}), "test", dets,
                                          tmp_path / "out")
    metrics = result.manifest.metrics
    assert metrics["num_images"] == 2 and metrics["skipped_images"] == ["000003"]
    assert metrics["mAP"] == pytest.approx(EXPECTED_MAP, abs=1e-12)


def test_missing_class_files_mean_no_detections_but_an_empty_folder_is_an_error(tmp_path, devkit, no_plot):
    dets = write_detections(tmp_path / "dets")
    (dets / "comp4_det_test_cat.txt").unlink()
    result = evaluate.evaluate_folder(_cfg(tmp_path, devkit), "test", dets, tmp_path / "out")
    assert result.manifest.metrics["ap"]["cat"] == 0.0
    write_voc_devkit(tmp_path / "other", split="val")
    with pytest.raises(InputError, match="wrong folder or --split"):  # no comp4_det_val_* file at all
        evaluate.evaluate_folder(_cfg(tmp_path, tmp_path / "other"), "val", dets, tmp_path / "out2")
    with pytest.raises(InputError, match="no such detections folder"):
        evaluate.evaluate_folder(_cfg(tmp_path, devkit), "test", tmp_path / "nope", tmp_path / "out2")


def _fake_detect(cfg, comp4_dir_writer, split="test", bbox=True):
    """A finished detect stage of the default variant, as the detect stage's manifest describes it."""
    run = Run(cfg.run_dir)
    tag = detect_tag(split, "ftfc7", False, len(cfg.features.scales), bbox)
    folder = run.stage_dir("detect", tag)
    comp4_dir = comp4_dir_writer(folder / "comp4")
    return run.write_manifest("detect", tag, config={"detect": cfg.section("detect")}, inputs={},
                              outputs={"comp4_dir": comp4_dir}), tag


def test_run_evaluates_the_runs_own_detections(tmp_path, devkit, no_plot):
    cfg = _cfg(tmp_path, devkit)
    with pytest.raises(StageInputMissing, match="spp detect"):
        evaluate.run(cfg, "test")
    detect_manifest, tag = _fake_detect(cfg, write_detections)
    result = evaluate.run(cfg, "test")
    folder = Run(cfg.run_dir).stage_dir("eval", tag)
    assert result.manifest.path == folder / "MANIFEST.json" and not result.skipped
    assert result.manifest.metrics["mAP"] == pytest.approx(EXPECTED_MAP, abs=1e-12)
    assert result.manifest.data["inputs"]["detect"]["fingerprint"] == detect_manifest.fingerprint
    assert "dataset" in result.manifest.data["inputs"]
    assert json.loads((folder / "metrics.json").read_text())["ap"]["cat"] == pytest.approx(1.0, abs=1e-15)
    assert evaluate.run(cfg, "test").skipped

    # the area metric gets its own folder, so table9's VOC07 numbers stay
    area = evaluate.run(cfg, "test", metric="area")
    assert area.manifest.path.parent.name == f"{tag}-area"
    assert read_manifest(folder / "MANIFEST.json").metrics["metric"] == "voc07"

    # a rerun of detect (new fingerprint) makes the eval rerun
    _fake_detect(cfg, lambda d: write_detections(d, extra_dog=[("000003", 0.95, (1, 1, 10, 10))]))
    rerun = evaluate.run(cfg, "test")
    assert not rerun.skipped and rerun.manifest.metrics["ap"]["dog"] < DOG_AP_VOC07

    # --out elsewhere works too, but never over another stage's folder
    out = evaluate.run(cfg, "test", out=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "metrics.json").exists() and out.manifest.metrics["mAP"] > 0
    detect_folder = Run(cfg.run_dir).stage_dir("detect", tag)
    with pytest.raises(SppError, match="another stage"):
        evaluate.run(cfg, "test", out=detect_folder)
    assert (detect_folder / "MANIFEST.json").exists()
