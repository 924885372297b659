"""``spp detect --images`` and the Python API under it (``stages.detector``), on one tiny trained run.

The run (synth data, tiny scales and nets, ftfc7 SVMs and box regressors at one scale) is made once for the
module; it detects badly, so its scores are mostly negative: the tests pick thresholds from the scores the API
returns, and check that the CLI writes exactly what the API computes. At the end: the profile both detections
report (where the time goes), and that what was made faster for it still gives the same results.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sppcli.cli import cli
from stages import detect, synth
from stages.core import boxes as B
from stages.core import fcfeatures
from stages.core.artifacts import Run
from stages.core.bboxreg import apply_bbox
from stages.core.errors import InputError, SppError
from stages.core.proposals import load_proposals, selective_search
from stages.core.runconfig import resolve_config
from stages.core.scoring import LiveMaps, one_blas_thread
from stages.core.timing import ONCE_PHASES
from stages.core.voc import read_comp4
from stages.detector import (BOX_CONVENTION, IMAGE_EXTENSIONS, Detector, Detections, detect_images,
                             expand_image_paths, output_ids)

TINY = ["model.fc_dim=32", "features.scales=[96, 128]", "features.one_scale=128", "pretrain.sizes=[64, 80]",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.workers=0", "proposals.max_boxes=60",
        "proposals.workers=1", "finetune.iters=6", "finetune.lr_steps=[4]", "finetune.eval_every=3",
        "finetune.batch_size=16", "finetune.holdout_batches=1"]
LOW = -100.0  # below every score: what the API keeps with it is every detection NMS leaves


def _invoke(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect_images")
    devkit = root / "synth"
    synth.generate(devkit, seed=1, images=12, crops_per_class=6)
    runs = root / "runs"
    common = ["--run", "r", "--runs-root", str(runs), "--dataset", "synth", "--voc-root", str(devkit),
              "--device", "cpu"]
    _invoke("pretrain", *common, "--config", "synth", *[a for s in TINY for a in ("--set", s)])
    _invoke("proposals", *common, "--split", "trainval")
    _invoke("extract-features", *common, "--split", "trainval")
    _invoke("finetune", *common)
    _invoke("train-svm", *common, "--feature", "ftfc7", "--one-scale")
    _invoke("train-bbox", *common, "--one-scale")
    detector = Detector.from_run(runs / "r", feature="ftfc7", one_scale=True, bbox=True, device="cpu",
                                 score_thresh=LOW)
    jpegs = sorted((devkit / "VOC2007" / "JPEGImages").glob("*.jpg"))
    return SimpleNamespace(root=root, runs=runs, run_dir=runs / "r", common=common, detector=detector,
                           jpegs=jpegs, cli=["--run", "r", "--runs-root", str(runs), "--device", "cpu", "--one-scale"])


def _images_dir(trained, tmp_path: Path, n: int = 2) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in trained.jpegs[:n]:
        shutil.copy(source, folder / source.name)
    return folder


def _json(out: Path) -> dict:
    return json.loads((out / "detections.json").read_text())


def _api_records(found: Detections, thresh: float) -> list[dict]:
    return [r for r in found.to_records() if r["score"] > thresh]


# -- inputs: files, folders, globs ------------------------------------------------------------------------------
def test_expand_takes_files_folders_and_globs_once_each(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    names = ["b.JPG", "a.jpeg", "c.Png", "d.bmp", "e.TIF", "f.tiff", "g.webp", "notes.txt", ".hidden.jpg",
             "sub/deep.jpg", "x_detections.jpg"]
    for name in names:
        (folder / name).write_bytes(b"x")
    listed = [p.name for p in expand_image_paths([folder])]
    assert listed == ["a.jpeg", "b.JPG", "c.Png", "d.bmp", "e.TIF", "f.tiff", "g.webp", "x_detections.jpg"]
    assert {Path(n).suffix.lower() for n in listed} <= set(IMAGE_EXTENSIONS)
    # an explicit file is taken whatever its name; a file named twice (directly and by a folder) comes once
    both = expand_image_paths([folder / "notes.txt", folder / "a.jpeg", folder])
    assert [p.name for p in both][:3] == ["notes.txt", "a.jpeg", "b.JPG"] and len(both) == 9
    # patterns expanded here (the shell did not), ** for any depth, image files only
    assert [p.name for p in expand_image_paths([str(folder / "*.[tT]*")])] == ["e.TIF", "f.tiff"]
    assert [p.name for p in expand_image_paths([str(folder / "**" / "*.jpg")])] == ["deep.jpg", "x_detections.jpg"]
    # the drawn outputs of an --out folder are not inputs when the folder is read again
    assert "x_detections.jpg" not in [p.name for p in expand_image_paths([folder], skip_outputs_in=folder)]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jpg", "no such file or folder"),
    (lambda d: d, "no images (jpg, jpeg, png, bmp, tif, tiff, webp) in this folder"),
    (lambda d: str(d / "*.png"), "no image file matches this pattern"),
])
def test_expand_names_what_is_missing(tmp_path, make, message):
    (tmp_path / "notes.txt").write_text("x")
    target = make(tmp_path)
    with pytest.raises(SppError) as err:
        expand_image_paths([target])
    assert str(err.value) == f"{target}: {message}"


def test_output_ids_are_unique_stems():
    paths = [Path("a/x.jpg"), Path("b/x.jpg"), Path("c/x.png"), Path("x_2.jpg"), Path("my photo.jpg")]
    assert output_ids(paths) == ["x", "x_2", "x_3", "x_2_2", "my_photo"]


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_folder_glob_and_several_files_give_the_apis_detections(trained, tmp_path):
    folder = _images_dir(trained, tmp_path, 2)
    png = tmp_path / "other" / "000001.png"  # same stem as a jpeg in the folder
    png.parent.mkdir()
    Image.open(trained.jpegs[0]).save(png)
    glob_dir = tmp_path / "globbed"
    glob_dir.mkdir()
    shutil.copy(trained.jpegs[2], glob_dir / trained.jpegs[2].name)
    out = tmp_path / "out"
    # --images takes several paths (the rest land in PATHS), is repeatable, and a quoted pattern is expanded here
    result = _invoke("detect", *trained.cli, "--images", folder, png, "--images", str(glob_dir / "*.jpg"),
                     "--out", out, "--score-thresh", LOW)
    data = _json(out)
    images = [r["image"] for r in data["images"]]
    # in order: the --images values, then the other PATHS
    assert images == [str(folder / trained.jpegs[0].name), str(folder / trained.jpegs[1].name),
                      str(glob_dir / trained.jpegs[2].name), str(png)]
    assert [r["id"] for r in data["images"]] == ["000001", "000002", "000003", "000001_2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["detections.json"] + [f"{i}_detections.jpg" for i in ("000001", "000002", "000001_2", "000003")])
    # the exact schema
    assert set(data) == {"format", "box_convention", "run", "feature", "one_scale", "bbox", "scales",
                         "score_thresh", "score", "test_flip", "classes", "complete", "images", "skipped", "profile"}
    assert data["format"] == "sppnet-detections/1" and data["box_convention"] == BOX_CONVENTION
    assert data["test_flip"] is False
    assert "0-based" in BOX_CONVENTION and "x2, y2 exclusive" in BOX_CONVENTION
    assert (data["feature"], data["one_scale"], data["bbox"], data["scales"]) == ("ftfc7", True, True, [128])
    assert data["classes"] == list(trained.detector.classes) and data["score_thresh"] == LOW
    assert data["complete"] is True and data["skipped"] == []
    for record in data["images"]:
        assert set(record) == {"image", "id", "drawn", "width", "height", "detections"}
        assert record["drawn"] == f"{record['id']}_detections.jpg"
        drawn = Image.open(out / record["drawn"])
        assert drawn.size == (record["width"], record["height"]) and drawn.format == "JPEG"
        for det in record["detections"]:
            assert set(det) == {"class", "score", "box"} and det["class"] in data["classes"]
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
        scores = [d["score"] for d in record["detections"]]
        assert scores == sorted(scores, reverse=True)
        # exactly what the API computes on the same file (JSON floats round-trip exactly)
        assert record["detections"] == trained.detector.detect(record["image"]).to_records()
    assert sum(len(r["detections"]) for r in data["images"]) > 0
    assert "on 4 image(s)" in result.output and str(out / "detections.json") in result.output


def test_score_thresh_keeps_only_scores_above_it(trained, tmp_path):
    folder = _images_dir(trained, tmp_path, 2)
    everything = [trained.detector.detect(p) for p in sorted(folder.iterdir())]
    scores = np.sort(np.concatenate([f.scores for f in everything]))
    assert len(scores) >= 4
    low, high = float(scores[len(scores) // 4]), float(scores[3 * len(scores) // 4])
    counts = {}
    for name, thresh in (("low", low), ("high", high)):
        out = tmp_path / name
        _invoke("detect", *trained.cli, folder, "--out", out, "--score-thresh", thresh)  # PATHS alone work too
        data = _json(out)
        assert data["score_thresh"] == thresh
        for record, found in zip(data["images"], everything):
            assert record["detections"] == _api_records(found, thresh)  # NMS before or after the cut: the same
        counts[name] = sum(len(r["detections"]) for r in data["images"])
    assert 0 < counts["high"] < counts["low"]
    # the default: 0.0 for SVM scores (this tiny run's are mostly negative)
    out = tmp_path / "default"
    result = _invoke("detect", *trained.cli, folder, "--out", out)
    data = _json(out)
    assert data["score_thresh"] == 0.0
    assert [r["detections"] for r in data["images"]] == [_api_records(f, 0.0) for f in everything]
    assert "scoring above 0 on 2 image(s)" in result.output


def test_comp4_files_on_request(trained, tmp_path):
    folder = _images_dir(trained, tmp_path, 2)
    out = tmp_path / "out"
    _invoke("detect", *trained.cli, "--images", folder, "--out", out)
    assert not list(out.glob("comp4_*"))
    _invoke("detect", *trained.cli, "--images", folder, "--out", out, "--score-thresh", LOW, "--comp4", "mine")
    data = _json(out)
    assert sorted(p.name for p in out.glob("comp4_*")) == sorted(f"comp4_det_mine_{c}.txt" for c in data["classes"])
    for name in data["classes"]:
        comp4 = read_comp4(out / f"comp4_det_mine_{name}.txt")  # back in sppnet's convention
        expected = [(r["id"], d["score"], d["box"]) for r in data["images"] for d in r["detections"]
                    if d["class"] == name]
        assert comp4.image_ids == [e[0] for e in expected]
        np.testing.assert_allclose(comp4.scores, [e[1] for e in expected], atol=1e-6)
        np.testing.assert_allclose(comp4.boxes.reshape(-1, 4), np.array([e[2] for e in expected]).reshape(-1, 4),
                                   atol=0.051)  # written with one decimal
    first = next(d for r in data["images"] for d in r["detections"] if d["class"] == data["classes"][0])
    line = (out / f"comp4_det_mine_{data['classes'][0]}.txt").read_text().splitlines()[0].split()
    x1, y1, x2, y2 = first["box"]  # the file is 1-based inclusive: xmin = x1 + 1, xmax = x2
    assert [float(v) for v in line[2:]] == [round(x1 + 1, 1), round(y1 + 1, 1), round(x2, 1), round(y2, 1)]


def _with_bad_file(trained, tmp_path) -> tuple[Path, Path]:
    folder = _images_dir(trained, tmp_path, 2)
    bad = folder / "000001b.jpg"  # sorts between the two good ones
    bad.write_bytes(b"this is not a JPEG")
    return folder, bad


def test_a_bad_file_stops_with_one_line_and_keeps_what_was_done(trained, tmp_path):
    folder, bad = _with_bad_file(trained, tmp_path)
    out = tmp_path / "out"
    result = _invoke("detect", *trained.cli, folder, "--out", out, "--score-thresh", LOW, expect=1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {bad}: corrupt")
    assert "--skip-bad" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["000001_detections.jpg", "detections.json"]
    data = _json(out)
    assert data["complete"] is False and [r["id"] for r in data["images"]] == ["000001"]


@pytest.mark.parametrize("how", [["--skip-bad"], ["--set", "data.skip_bad=true"]])
def test_a_bad_file_is_skipped_with_a_warning(trained, tmp_path, how):
    folder, bad = _with_bad_file(trained, tmp_path)
    out = tmp_path / "out"
    result = _invoke("detect", *trained.cli, folder, "--out", out, *how)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {bad}: corrupt") and "skipped" in warnings[0]
    assert "on 2 image(s), 1 bad image(s) skipped" in result.stdout
    data = _json(out)
    assert data["complete"] is True and [r["id"] for r in data["images"]] == ["000001", "000002"]
    assert [s["image"] for s in data["skipped"]] == [str(bad)] and "corrupt" in data["skipped"][0]["error"]
    assert not (out / "000001b_detections.jpg").exists()


@pytest.mark.parametrize("args, message", [
    (["--images", "x.jpg"], "--images needs --out DIR"),
    (["--out", "o"], "--out only apply with --images"),
    (["--score-thresh", "1", "--comp4", "t"], "--score-thresh, --comp4 only apply with --images"),
    (["--split", "test", "--images", "x.jpg", "--out", "o"], "--split and --images (or PATHS) cannot go together"),
])
def test_option_mistakes_are_usage_errors(trained, args, message):
    result = _invoke("detect", *trained.cli, *args, expect=2)
    assert message in result.output


def test_a_missing_input_is_one_line_before_any_work(trained, tmp_path):
    out = tmp_path / "out"
    result = _invoke("detect", *trained.cli, "--images", trained.jpegs[0], tmp_path / "nope.jpg", "--out", out,
                     expect=1)
    assert result.output == f"error: {tmp_path / 'nope.jpg'}: no such file or folder\n"
    assert not out.exists()


# -- the Python API ---------------------------------------------------------------------------------------------
def test_path_pil_and_array_give_identical_detections(trained):
    path = trained.jpegs[0]
    by_path = trained.detector.detect(path)
    by_str = trained.detector.detect(str(path))
    with Image.open(path) as pil:
        by_pil = trained.detector.detect(pil)
    by_array = trained.detector.detect(np.asarray(Image.open(path).convert("RGB")))
    assert len(by_path) > 0 and by_path.image == str(path) and by_pil.image is None
    for other in (by_str, by_pil, by_array):
        np.testing.assert_array_equal(other.boxes, by_path.boxes)
        np.testing.assert_array_equal(other.scores, by_path.scores)
        np.testing.assert_array_equal(other.labels, by_path.labels)
    assert (by_path.width, by_path.height) == Image.open(path).size
    # the result: arrays, names, dict-like access, read-only
    assert by_path.boxes.shape == (len(by_path), 4) and by_path.boxes.dtype == np.float64
    assert by_path.labels.dtype == np.int64 and by_path.classes == trained.detector.classes
    assert list(by_path.names) == [by_path.classes[k] for k in by_path.labels]
    assert list(by_path.keys()) == ["boxes", "scores", "labels", "names"]
    assert by_path["scores"] is by_path.scores and dict(by_path)["names"] == by_path.names
    assert np.all(np.diff(by_path.scores) <= 0)
    with pytest.raises(ValueError):
        by_path.boxes[0, 0] = 1.0
    # a per-call threshold is the same as cutting the full result
    cut = trained.detector.detect(path, score_thresh=float(np.median(by_path.scores)))
    assert cut.to_records() == _api_records(by_path, float(np.median(by_path.scores)))
    assert [f.to_records() for f in trained.detector.detect_many([path, str(path)])] == [by_path.to_records()] * 2


def test_exif_orientation_is_applied(trained, tmp_path):
    upright = np.asarray(Image.open(trained.jpegs[1]).convert("RGB"))
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # a camera that stored it turned; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.png"
    Image.fromarray(stored).save(path, exif=exif)
    by_path = trained.detector.detect(path)
    with Image.open(path) as pil:
        by_pil = trained.detector.detect(pil)
    by_array = trained.detector.detect(upright)
    assert (by_path.width, by_path.height) == (upright.shape[1], upright.shape[0])
    for other in (by_pil, by_array):
        np.testing.assert_array_equal(other.boxes, by_path.boxes)
        np.testing.assert_array_equal(other.scores, by_path.scores)


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG nope")
    with pytest.raises(InputError) as err:
        trained.detector.detect(bad)
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)
    with pytest.raises(SppError, match=r"expected an RGB uint8 array \[H, W, 3\].*float32 \[4, 5, 3\]"):
        trained.detector.detect(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(SppError, match="cannot detect on a list"):
        trained.detector.detect([1, 2])


def test_from_run_by_name_and_its_errors(trained, tmp_path):
    by_name = Detector.from_run("r", runs_root=trained.runs, device="cpu", score_thresh=LOW)
    assert by_name.cfg.run_dir == trained.run_dir and by_name.classes == trained.detector.classes
    np.testing.assert_array_equal(by_name.detect(trained.jpegs[0]).scores,
                                  trained.detector.detect(trained.jpegs[0]).scores)
    assert by_name.score_thresh == LOW and Detector.from_run(trained.run_dir, device="cpu").score_thresh == 0.0
    with pytest.raises(SppError, match="not a trained run: no config.json"):
        Detector.from_run(tmp_path / "nothing")
    with pytest.raises(SppError, match=r"run `spp train-svm --run r .*--feature fc7 --one-scale` first"):
        Detector.from_run(trained.run_dir, feature="fc7", device="cpu")
    with pytest.raises(SppError, match=r"run `spp train-bbox --run r .*` first"):
        Detector.from_run(trained.run_dir, one_scale=False, feature="softmax", device="cpu")
    softmax = Detector.from_run(trained.run_dir, feature="softmax", device="cpu")
    assert softmax.score_thresh == 0.5 and softmax.classes == trained.detector.classes
    probabilities = softmax.detect(trained.jpegs[0], score_thresh=0.0).scores
    assert len(probabilities) and np.all((probabilities > 0) & (probabilities <= 1))


# -- where the time goes (core.timing's profile) ----------------------------------------------------------------
PER_IMAGE = ("read", "pool", "fc", "score", "nms", "bbox", "write")


def _check_profile(prof: dict, images: int, phases: tuple[str, ...]) -> None:
    """Disjoint phases that cover the run: their sum is the measured total, less small gaps (loop glue)."""
    seconds = prof["seconds"]
    assert set(ONCE_PHASES + phases) <= set(seconds) and prof["images"] == images > 0
    assert seconds["startup"] > 0 and prof["first_image_s"] == seconds["startup"] + seconds["load"]
    total, covered = prof["total_s"], sum(seconds.values())
    assert covered <= total + 1e-9  # no phase counted twice
    # the gaps are loop glue: 5% of the run, plus 50 ms for one preemption or garbage collection on a busy machine
    assert prof["unaccounted_s"] == pytest.approx(total - covered) and total - covered <= 0.05 * total + 0.05
    assert prof["per_image"] == pytest.approx({p: s / images for p, s in seconds.items() if p not in ONCE_PHASES})
    assert prof["per_image_s"] == pytest.approx(sum(prof["per_image"].values()))
    assert prof["counts"]["fc_windows"] <= prof["counts"]["windows"]


def test_split_detection_reports_where_its_time_goes(trained):
    cfg = resolve_config(None, {"run": "r", "runs_root": str(trained.runs), "device": "cpu"})
    result = detect.run(cfg, "trainval", "ftfc7", one_scale=True)
    metrics = result.manifest.metrics
    _check_profile(metrics["profile"], metrics["images"], PER_IMAGE)
    proposals = load_proposals(Run(cfg.run_dir), "trainval")
    assert metrics["profile"]["counts"]["windows"] == sum(len(proposals.boxes(i)) for i in proposals.image_ids)
    assert result.summary.splitlines()[1].startswith("profile: ")


def test_image_detection_reports_where_its_time_goes(trained, tmp_path):
    folder = _images_dir(trained, tmp_path, 3)
    out = tmp_path / "out"
    result = detect_images(trained.detector, [folder], out, comp4="mine")
    prof = _json(out)["profile"]
    assert prof == result.extra["profile"]
    _check_profile(prof, 3, ("selective_search", "conv", *PER_IMAGE))
    assert prof["seconds"]["load"] == trained.detector.load_seconds
    printed = _invoke("detect", *trained.cli, folder, "--out", tmp_path / "cli").output.splitlines()
    assert printed[-1].startswith("profile: ") and " s to the first image (load " in printed[-1]


def test_batched_box_regression_and_nms_give_the_per_class_results(trained):
    # Scorer.score gathers every class's pool5 rows once and regresses on one BLAS thread; this is the per-class
    # loop it replaced (a gather and a regression per class, BLAS as configured): the same to the bit.
    scorer, image = trained.detector.scorer, np.asarray(Image.open(trained.jpegs[3]).convert("RGB"))
    height, width = image.shape[:2]
    windows = selective_search(image, scorer.cfg.proposals, seed=scorer.cfg.seed)
    with torch.inference_mode():
        live = LiveMaps(trained.detector.backbone, scorer.scales, image, scorer.device)
        found = scorer.score(live, "image", windows, (width, height), score_thresh=LOW)
        maps = fcfeatures.load_maps(live, "image", scorer.scales_subset)
        rule = scorer.cfg.features.scale_rule
        distinct = fcfeatures.distinct_windows(maps, windows, rule=rule)
        pooled = fcfeatures.pool_windows(maps, windows[distinct.rows],
                                         fcfeatures.feature_pyramid(scorer.nets, scorer.cfg.model.pyramid),
                                         scale_index=distinct.scale_index, rule=rule)
        feats = fcfeatures.head_features(pooled, "ftfc7", scorer.nets)
        scores = scorer.models.svm.scores(feats)[torch.as_tensor(distinct.inverse)].double().numpy()
    d = scorer.cfg.detect
    assert len(found) == scores.shape[1] and sum(len(s) for _, s in found) > 10
    for k, (kept_boxes, kept_scores) in enumerate(found):
        rows = np.flatnonzero(scores[:, k] > LOW)
        rows = rows[B.nms(windows[rows], scores[rows, k], d.nms_iou)[:d.max_per_image]]
        moved = B.clip_boxes(apply_bbox(scorer.models.bbox, k, pooled[torch.as_tensor(distinct.inverse[rows])],
                                        windows[rows], (width, height)), width, height)
        keep = B.nms(moved, scores[rows, k], d.nms_iou)
        np.testing.assert_array_equal(kept_boxes, moved[keep])
        np.testing.assert_array_equal(kept_scores, scores[rows, k][keep])


def test_one_blas_thread_gives_the_same_products():
    rng = np.random.default_rng(1)
    for rows, dim in ((1, 12800), (37, 6400), (100, 4480), (100, 12800)):
        X = rng.random((rows, dim)).astype(np.float32).astype(np.float64) * 0.17
        beta, T = rng.standard_normal((dim, 4)), rng.standard_normal((4, 4))
        shared = (X @ beta + 0.3) @ T
        with one_blas_thread():
            alone = (X @ beta + 0.3) @ T
        np.testing.assert_array_equal(alone, shared)


def test_detection_imports_neither_sklearn_nor_torchvision(trained):
    # What start-up no longer pays for a ZF-5 run: scikit-learn (SVMs are applied, not fitted), torchvision and
    # the torch._dynamo / sympy it or a meta-device init pulls in (NMS and roi_pool load only torchvision's kernels).
    code = (f"import sys\nfrom stages.detector import Detector\n"
            f"d = Detector.from_run({str(trained.run_dir)!r}, device='cpu', score_thresh=-100.0)\n"
            f"assert len(d.detect({str(trained.jpegs[0])!r})) > 0\n"
            "print([m for m in ('sklearn', 'torchvision', 'torch._dynamo', 'sympy') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- detect.test_flip: the mirrored image's scores averaged in ---------------------------------------------------
KEEP_ALL = {"detect.nms_iou": 1.0, "detect.max_per_image": 100000}  # no window dropped by NMS or the cap


def _plain_and_flipped(trained, bbox: bool) -> tuple[Detector, Detector]:
    """The trained run's detector keeping every window, without and with ``detect.test_flip``."""
    return tuple(Detector.from_run(trained.run_dir, feature="ftfc7", bbox=bbox, device="cpu",
                                   overrides={**KEEP_ALL, "detect.test_flip": flip}) for flip in (False, True))


def _score_every_window(detector: Detector, image: np.ndarray, windows: np.ndarray) -> list[tuple]:
    """``Scorer.score``'s per-class (boxes, scores) of ``windows`` on ``image``, every window kept."""
    height, width = image.shape[:2]
    with torch.inference_mode():
        live = LiveMaps(detector.backbone, detector.scales, image, detector.scorer.device)
        found = detector.scorer.score(live, "image", windows, (width, height), score_thresh=LOW)
    assert all(len(kept_boxes) == len(windows) for kept_boxes, _ in found)
    return found


def _all_window_scores(detector: Detector, image: np.ndarray, windows: np.ndarray) -> list[dict]:
    """Per class, {window: score} of every window."""
    return [{tuple(np.round(b, 6)): s for b, s in zip(kept_boxes, kept_scores)}
            for kept_boxes, kept_scores in _score_every_window(detector, image, windows)]


def test_test_flip_averages_the_scores_of_the_mirrored_image(trained):
    plain, flipped = _plain_and_flipped(trained, bbox=False)
    image = np.asarray(Image.open(trained.jpegs[5]).convert("RGB"))
    width = image.shape[1]
    windows = selective_search(image, plain.cfg.proposals, seed=plain.cfg.seed)
    mirror = np.ascontiguousarray(image[:, ::-1])
    own = _all_window_scores(plain, image, windows)
    # The mirrored image as a photo of its own, its windows mirrored: no flip anywhere in the scorer.
    seen_mirrored = _all_window_scores(plain, mirror, B.flip_boxes(windows, width))
    averaged = _all_window_scores(flipped, image, windows)
    differs = 0
    for k in range(len(own)):
        for box in own[k]:
            back = tuple(np.round(B.flip_boxes(np.array([box]), width)[0], 6))
            expected = (own[k][box] + seen_mirrored[k][back]) / 2
            assert averaged[k][box] == pytest.approx(expected, rel=1e-9, abs=1e-9)
            differs += abs(own[k][box] - expected) > 1e-6
    assert differs > 0  # the mirrored image does change the scores: the check above could fail


def test_test_flip_on_a_split_needs_mirrored_maps_and_extract_features_stores_them(trained, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained.runs, runs)
    common = [a if a != str(trained.runs) else str(runs) for a in trained.common]
    flip = ["--set", "detect.test_flip=true"]
    _invoke("proposals", *common, "--split", "test")
    _invoke("extract-features", *common, "--split", "test")
    _invoke("detect", *common, "--split", "test", "--feature", "ftfc7", "--one-scale")
    run = Run(runs / "r")
    before = run.require("detect", "test-ftfc7-s1-bb").fingerprint
    result = _invoke("detect", *common, "--split", "test", "--feature", "ftfc7", "--one-scale", *flip, expect=1)
    line = result.output.strip().splitlines()[-1]
    assert "needs the mirrored maps of split 'test'" in line
    assert "spp extract-features" in line and "--split test" in line and "--set detect.test_flip=true" in line
    assert run.require("detect", "test-ftfc7-s1-bb").fingerprint == before  # checked before anything was undone
    _invoke("extract-features", *common, "--split", "test", *flip)
    _invoke("detect", *common, "--split", "test", "--feature", "ftfc7", "--one-scale", *flip)
    made = run.require("detect", "test-ftfc7-s1-bb")
    assert made.data["config"]["detect"]["test_flip"] is True
    # Without it, the record has no test_flip key: detections made before the setting existed stay up to date.
    cfg = resolve_config(None, {"run": "r", "runs_root": str(runs), "device": "cpu", "detect.test_flip": False})
    assert "test_flip" not in detect.fccompress.detect_record(cfg.detect)
    assert not list((runs / "r" / "02_features" / "test").glob("*.corrupt"))  # detect closed its cache


def test_which_splits_store_mirrored_maps():
    from stages.core.config import build_config
    from stages.extract_features import stores_flip

    cfg = build_config("synth", {"features.flip": True})
    assert stores_flip(cfg, "trainval") and not stores_flip(cfg, "test") and not stores_flip(cfg, "val")
    assert not stores_flip(cfg, "trainval", conv_from="finetune")
    assert not stores_flip(build_config("synth", {"features.flip": False}), "trainval")
    on = build_config("synth", {"features.flip": True, "detect.test_flip": True})
    assert stores_flip(on, "test") and stores_flip(on, "val")  # any split detect may score
    assert stores_flip(on, "test", conv_from="finetune")  # a --conv model's own maps, mirrored for detection


def test_test_flip_moves_boxes_as_the_image_alone_does(trained):
    # Box regression reads the image as it is: with test_flip only the scores change, not where a window goes.
    plain, flipped = _plain_and_flipped(trained, bbox=True)
    image = np.asarray(Image.open(trained.jpegs[2]).convert("RGB"))
    windows = selective_search(image, plain.cfg.proposals, seed=plain.cfg.seed)
    found = [_score_every_window(detector, image, windows) for detector in (plain, flipped)]
    moved = 0
    for (boxes_plain, scores_plain), (boxes_flip, scores_flip) in zip(*found):
        np.testing.assert_array_equal(np.unique(boxes_plain, axis=0), np.unique(boxes_flip, axis=0))
        assert not np.array_equal(scores_plain, scores_flip)
        moved += not np.array_equal(np.unique(boxes_plain, axis=0), np.unique(windows, axis=0))
    assert moved  # the regressors do move boxes: the equality above says something
