"""Several processes: ``--nproc-per-node N`` (the command runs itself again under torchrun), torchrun's own command
line, and 2 CPU (gloo) processes against one for pretrain (same weights), extract-features (same maps),
proposals (same boxes) and finetune (same model, cached and --conv), plus proposals' rank sharding in-process
(shares, rank 0's merge, stale rank files)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sppcli import cli as spp_cli
from stages import finetune as finetune_stage
from stages import proposals as proposals_stage
from stages.core import launch, nets
from stages.core.artifacts import CONV_LAYERS_PART, Run, read_manifest
from stages.core.config import build_config
from stages.core.errors import SppError
from stages.core.features import features_for
from stages.core.proposals import load_proposals
from stages.core.runconfig import resolve_config

from conftest import write_devkit

REPO = Path(__file__).resolve().parents[1]
SHARDED = {"pretrain": [], "proposals": ["--split", "val"], "extract-features": ["--split", "val"], "finetune": []}


def _spp(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m sppcli ARGS`` in a fresh process; one kernel thread per process (2 ranks on 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SPP_PROGRESS": "0"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "sppcli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"spp {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


# -- the launch command ------------------------------------------------------------------------------------------
def _torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    return parser


def test_torchrun_reads_none_of_the_commands_options():
    cmd = launch.torchrun_command(2, "sppcli", ["pretrain", "--run", "X", "--runs-root", "R"])
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    args = _torchrun_parser().parse_args(cmd[3:])
    assert args.standalone and args.module and args.nproc_per_node == "2"
    assert args.training_script == "sppcli" and args.training_script_args == ["pretrain", "--run", "X",
                                                                               "--runs-root", "R"]
    # what the issue hit: without `--`, torchrun takes --run for an abbreviation of its own --run-path
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _torchrun_parser().parse_args(["--nproc-per-node", "2", "-m", "sppcli", "pretrain", "--run", "X"])
    with pytest.raises(Exception, match="1 or more"):
        launch.torchrun_command(0, "sppcli", [])


@pytest.mark.parametrize("command", sorted(SHARDED))
@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_a_bad_process_count_is_a_one_line_usage_error(command, bad):
    result = CliRunner().invoke(spp_cli.cli, [command, *SHARDED[command], "--nproc-per-node", bad])
    assert result.exit_code == 2
    assert result.output == f"error: Invalid value for '--nproc-per-node': '{bad}' is not a process count " \
                            "(1 or more)\n"


@pytest.mark.parametrize("command", sorted(SHARDED))
def test_help_shows_the_option_and_the_torchrun_form_that_works(command):
    text = CliRunner().invoke(spp_cli.cli, [command, "--help"]).output
    assert "--nproc-per-node N" in text
    assert f"torchrun --standalone --nproc-per-node N -m -- sppcli {command}" in text


def test_nproc_runs_the_same_command_line_again_under_torchrun(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda n, module, argv: calls.append((n, module, list(argv))) or 3)
    monkeypatch.setattr(proposals_stage, "run", lambda *a, **k: pytest.fail("the launcher must not run the stage"))
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    args = ["-q", "proposals", "--split", "val", "--runs-root", str(tmp_path), "--run", "my run",
            "--nproc-per-node", "2", "--workers", "1"]
    result = CliRunner().invoke(spp_cli.cli, args)
    assert result.exit_code == 3  # torchrun's status
    assert calls == [(2, "sppcli", args)]
    assert not (tmp_path / "my run").exists()  # the launcher itself writes nothing

    # a bad value stops in the launcher, once, before any process starts
    result = CliRunner().invoke(spp_cli.cli, [*args, "--set", "proposals.max_boxes=-3"])
    assert result.exit_code == 1 and "proposals.max_boxes" in result.output and len(calls) == 1

    # a torchrun worker sees WORLD_SIZE and runs its share
    ran = []
    monkeypatch.setattr(proposals_stage, "run", lambda cfg, split, boxes_file=None: ran.append(split) or
                        type("R", (), {"skipped": False, "summary": "rank 1/2 ok", "manifest": None})())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(spp_cli.cli, args)
    assert result.exit_code == 0 and ran == ["val"] and len(calls) == 1 and "rank 1/2 ok" in result.output


# -- proposals: rank sharding in-process ---------------------------------------------------------------------------
def scene(seed: int, height: int = 96, width: int = 128):
    """A noisy gradient with two solid rectangles; (RGB image, objects) for write_devkit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 80 / width + 40, yy * 80 / height + 40, np.full_like(xx, 90.0)], axis=2)
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    objects = []
    for k in range(2):
        w, h = int(rng.integers(width // 4, width // 2)), int(rng.integers(height // 4, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        image[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
        objects.append(("red" if k % 2 == 0 else "green", (x0 + 1, y0 + 1, x0 + w, y0 + h), False))
    return image, objects


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    images = {f"im{k:03d}": scene(k) for k in range(5)}
    return write_devkit(tmp_path_factory.mktemp("launch") / "devkit", images, {"val": list(images)},
                        classes=("red", "green"))


def _proposal_cfg(runs: Path, devkit: Path, run: str = "r"):
    return build_config(None, {"runs_root": str(runs), "run": run, "data.dataset": "voc2007",
                               "data.voc_root": str(devkit), "proposals.workers": 1, "proposals.max_boxes": 50})


def _stored(cfg, split: str = "val") -> dict[str, np.ndarray]:
    with load_proposals(Run(cfg.run_dir), split) as store:
        return {image_id: store.boxes(image_id) for image_id in store.image_ids}


_SAME_METRICS = ("images", "images_skipped", "recall@0.5", "recall@0.7", "mabo", "boxes_per_image_mean",
                 "boxes_per_image_min", "boxes_per_image_max", "gt_boxes")


@pytest.fixture(scope="module")
def one_process_proposals(scenes, tmp_path_factory):
    cfg = _proposal_cfg(tmp_path_factory.mktemp("one"), scenes)
    result = proposals_stage.run(cfg, "val")
    return cfg, result.manifest


def test_two_ranks_share_the_images_and_rank0_merges_one_file(scenes, one_process_proposals, tmp_path,
                                                              monkeypatch):
    cfg = _proposal_cfg(tmp_path, scenes)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank1 = proposals_stage.run(cfg, "val")
    assert rank1.manifest is None and "rank 1/2: 2 image(s) computed" in rank1.summary
    folder = Run(cfg.run_dir).stage_dir("proposals", "val")
    assert sorted(p.stem for p in (folder / "partial").glob("*.npy")) == ["im001", "im003"]  # images 1::2
    assert json.loads((folder / "partial" / "rank1-of-2.json").read_text())["images_computed"] == 2
    assert not Run(cfg.run_dir).manifest_path("proposals", "val").exists()

    monkeypatch.setenv("RANK", "0")
    rank0 = proposals_stage.run(cfg, "val")
    assert rank0.manifest.data["outputs"] == {"proposals": "proposals.h5"}  # readers see one file
    assert not (folder / "partial").exists()
    single_cfg, single = one_process_proposals
    got, want = _stored(cfg), _stored(single_cfg)
    assert list(got) == list(want) == [f"im{k:03d}" for k in range(5)]
    for image_id in want:
        np.testing.assert_array_equal(got[image_id], want[image_id])
    for key in _SAME_METRICS:
        assert rank0.manifest.metrics[key] == single.metrics[key], key
    assert rank0.manifest.metrics["images_computed"] == 5 and rank0.manifest.metrics["workers"] == 2
    assert rank0.manifest.data["config"] == single.data["config"]  # the process count is no parameter

    # and the merged result is the stage's result for any process count: a plain rerun is up to date
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert proposals_stage.run(cfg, "val").skipped


def test_rank0_waits_for_a_rank_file_of_these_parameters_and_this_launch(scenes, tmp_path, monkeypatch):
    cfg = _proposal_cfg(tmp_path, scenes)
    folder = Run(cfg.run_dir).stage_dir("proposals", "val")
    params = proposals_stage._params(cfg, None)
    journal = proposals_stage._Journal(folder / "partial", params, shared=True)
    record = {"failed": {}, "images_computed": 2, "workers": 1, "compute_s": 1.0, "cpu_s": 1.0}
    seen = []

    def fake_wait(paths, ready, **kwargs):
        seen.append([ready(p) for p in paths])
        raise SppError("would wait")

    monkeypatch.setattr(proposals_stage, "wait_for_files", fake_wait)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")  # torchrun --standalone: a fresh uuid per launch
    this = launch.launch_id()
    journal.write_rank_done(1, 3, {**record, "params": {**params, "max_boxes": 7}, "launch": this})
    journal.write_rank_done(2, 3, {**record, "params": params, "launch": this})
    journal.write_rank_done(1, 2, {**record, "params": params, "launch": this})  # another process count
    with pytest.raises(SppError, match="would wait"):
        proposals_stage.run(cfg, "val")
    assert seen[-1] == [False, True]  # rank 1's file has other parameters
    assert (folder / "partial" / "im000.npy").exists()  # rank 0's images 0::3 are in the journal
    journal.write_rank_done(1, 3, {**record, "params": params, "launch": "launch-a/0"})
    with pytest.raises(SppError, match="would wait"):
        proposals_stage.run(cfg, "val")
    assert seen[-1] == [False, True]  # left by an earlier launch


# -- 2 CPU processes against one, through the CLI -----------------------------------------------------------------
def _symmetric_tree(root: Path, side: int = 48, train: int = 8, val: int = 4) -> Path:
    """An ImageFolder tree of PNG squares of ``side`` px, each its own mirror image (see the pretrain test)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label, shape in enumerate(("bar", "disc", "square")):
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                half = (rng.random((side, side // 2, 3)) * 90).astype(np.uint8)
                image = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
                colour = tuple(int(c) for c in rng.integers(120, 256, 3))
                cy, r = side // 2 + int(rng.integers(-6, 7)), int(rng.integers(side // 6, side // 3))
                c = side // 2
                if shape == "disc":
                    cv2.circle(image, (c, cy), r, colour, -1)
                elif shape == "square":
                    cv2.rectangle(image, (c - r, cy - r), (c + r - 1, cy + r), colour, -1)
                else:
                    cv2.rectangle(image, (c - r, cy - r // 4), (c + r - 1, cy + r // 4), colour, -1)
                image[:, side // 2:] = image[:, :side // 2][:, ::-1]  # the left half mirrored
                assert np.array_equal(image, image[:, ::-1])
                cv2.imwrite(str(root / split / shape / f"{k:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


PRETRAIN_SETS = ["pretrain.sizes=[48]", "pretrain.batch_size=8", "pretrain.optimizer=\"sgd\"", "pretrain.lr=0.01",
                 "pretrain.lr_steps=[]", "pretrain.crop_scale=[1.0, 1.0]", "pretrain.dropout=0.0",
                 "pretrain.workers=0", "model.fc_dim=64"]


@pytest.mark.slow
def test_pretrain_in_two_gloo_processes_gives_the_one_process_weights(tmp_path):
    """The same global batches, the same inputs, so the same weights up to float32 summation order.

    DistributedSampler draws one permutation from (seed, epoch) whatever the process count, and rank r takes its
    entries r::2; with a per-rank batch of 4, global batch k is {perm[8k..8k+7]} on both sides, and DDP averages
    the two ranks' mean gradients, which is the mean over the 8 images. The inputs must not depend on the
    per-rank random streams either: dropout 0, crop_scale (1, 1) on squares of the training size (the crop is
    the whole image, the resize a copy) and mirror-symmetric images (a flip changes nothing).
    What remains is float32 rounding (a sum over 4 + 4 instead of 8 images, then the all-reduce): a few float32
    epsilons (6e-8) relative per step, over 6 SGD steps; measured 3.5e-8 of the largest weight. The tolerance,
    1e-5 of the largest weight, leaves a wide margin for other CPUs' kernels, and training moved the weights by
    more than 1000 times that (asserted), so other batches or other inputs on one side would fail it."""
    tree = _symmetric_tree(tmp_path / "tree")
    common = ["--device", "cpu", "--data", str(tree), "--epochs", "2", "--run", "r",
              *[a for s in PRETRAIN_SETS for a in ("--set", s)]]
    _spp("pretrain", "--runs-root", str(tmp_path / "one"), *common)
    two = _spp("pretrain", "--runs-root", str(tmp_path / "two"), "--nproc-per-node", "2", *common)
    assert two.stdout.count("pretrain: 2 epoch(s)") == 1 and "pretrain rank 1/2: done" in two.stdout
    assert two.stderr.count("pretrain epoch 1/2") == 1  # only rank 0 logs the epochs
    _spp("pretrain", "--runs-root", str(tmp_path / "init"), *common[:4], "--epochs", "0", *common[6:])

    weights = {}
    for name in ("one", "two", "init"):
        model, _ = nets.load_checkpoint(tmp_path / name / "r" / "00_pretrain" / "model.pt")
        weights[name] = {k: v.float() for k, v in model.state_dict().items()}
    m1 = read_manifest(tmp_path / "one" / "r" / "00_pretrain" / "MANIFEST.json").metrics
    m2 = read_manifest(tmp_path / "two" / "r" / "00_pretrain" / "MANIFEST.json").metrics
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    scale = max(float(w.abs().max()) for w in weights["one"].values())
    tol = 1e-5 * scale
    diff = max(float((weights["one"][k] - weights["two"][k]).abs().max()) for k in weights["one"])
    moved = max(float((weights["one"][k] - weights["init"][k]).abs().max()) for k in weights["one"])
    assert diff <= tol, f"2 processes differ from 1 by {diff:.3g} (tolerance {tol:.3g})"
    assert moved > 1000 * tol, f"training moved the weights by only {moved:.3g}"
    for key in ("val_loss", "train_loss_per_epoch"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
    assert m2["val_accuracy_per_epoch"] == m1["val_accuracy_per_epoch"]
    assert m2["val_images"] == m1["val_images"] == 12


def _fake_pretrain(run_root: Path, width: float) -> Path:
    """A random-weight ZF-5 SppNet saved as the run's finished pretrain stage (the same for every seed-0 call)."""
    torch.manual_seed(0)
    model = nets.SppNet(nets.build_backbone("zf5", width=width), fc_dim=32, num_classes=3)
    run = Run(run_root)
    path = run.stage_dir("pretrain") / "model.pt"
    nets.save_checkpoint(path, model, {"class_names": ["a", "b", "c"]})
    run.write_manifest("pretrain", None, config={"seed": 0}, inputs={}, outputs={"model": path},
                       metrics={CONV_LAYERS_PART: nets.conv_layers_sha256(path)})
    return path


@pytest.fixture(scope="module")
def sized_devkit(tmp_path_factory) -> Path:
    """Three images, two of one size (batched together in a rank), one portrait."""
    rng = np.random.default_rng(0)
    images = {}
    for image_id, (height, width) in {"img0": (64, 80), "img1": (72, 56), "img2": (64, 80)}.items():
        pixels = (rng.random((height, width, 3)) * 80).astype(np.uint8)
        pixels[8:40, 10:44] = (210, 40, 30)
        images[image_id] = (pixels, [("red", (11, 9, 44, 40), False)])
    return write_devkit(tmp_path_factory.mktemp("sized") / "devkit", images, {"trainval": list(images)},
                        classes=("red", "green"))


@pytest.mark.slow
def test_extract_features_in_two_processes_gives_the_one_process_maps(sized_devkit, tmp_path):
    """Rank r extracts the images r::2 into its own shard; read back through FeatureCache every map (and its flip)
    equals the one-process map to within one float16 step: the maps are the same float32 numbers up to the
    summation order of a different batch (img0 + img2 share one batch in rank 0, not in one process), and
    rounding to float16 can then land one step apart."""
    sets = ["features.scales=[64, 96]", "features.batch_images=2", "features.flip=true"]
    common = ["--split", "trainval", "--run", "r", "--dataset", "synth", "--voc-root", str(sized_devkit),
              "--device", "cpu", *[a for s in sets for a in ("--set", s)]]
    width = build_config("synth").model.width
    for name in ("one", "two"):
        _fake_pretrain(tmp_path / name / "r", width)
    _spp("extract-features", "--runs-root", str(tmp_path / "one"), *common)
    two = _spp("extract-features", "--runs-root", str(tmp_path / "two"), "--nproc-per-node", "2", *common)
    assert "rank 1/2" in two.stdout and "features trainval: 3 images" in two.stdout

    single = features_for(Run(tmp_path / "one" / "r"), "trainval")
    sharded = features_for(Run(tmp_path / "two" / "r"), "trainval")
    assert len(single.paths) == 1 and len(sharded.paths) == 2
    assert sharded.image_ids == single.image_ids == ["img0", "img1", "img2"]
    exact = total = 0
    for image_id in single.image_ids:
        for flip in (False, True):
            for a, b in zip(sharded.maps(image_id, flip), single.maps(image_id, flip), strict=True):
                a16, b16 = a.numpy().astype(np.float16), b.numpy().astype(np.float16)
                assert np.array_equal(a16.astype(np.float32), a.numpy())  # the maps are float16 values
                step = np.spacing(np.maximum(np.abs(a16), np.abs(b16)))
                assert (np.abs(a16.astype(np.float32) - b16.astype(np.float32)) <= step).all()
                exact += int((a16 == b16).sum())
                total += a16.size
    assert exact / total > 0.99  # nearly all equal; the rest one float16 step apart


@pytest.mark.slow
def test_proposals_in_two_processes_give_the_one_process_boxes(scenes, one_process_proposals, tmp_path):
    """Selective search seeds each image from (seed, image id), so who computes it does not matter: identical."""
    single_cfg, single = one_process_proposals
    two = _spp("proposals", "--split", "val", "--runs-root", str(tmp_path), "--run", "r", "--dataset", "voc2007",
               "--voc-root", str(scenes), "--workers", "1", "--set", "proposals.max_boxes=50",
               "--nproc-per-node", "2")
    assert "proposals val: 5 images" in two.stdout and "rank 1/2: 2 image(s) computed" in two.stdout
    cfg = _proposal_cfg(tmp_path, scenes)
    got, want = _stored(cfg), _stored(single_cfg)
    assert list(got) == list(want)
    for image_id in want:
        np.testing.assert_array_equal(got[image_id], want[image_id])
    manifest = Run(cfg.run_dir).require("proposals", "val")
    for key in _SAME_METRICS:
        assert manifest.metrics[key] == single.metrics[key], key


def _finetune_cfg(root: Path, sets=()):
    """The config ``spp finetune --runs-root ROOT --run r --device cpu --set ...`` resolves (the run's saved one)."""
    return resolve_config(None, {"run": "r", "runs_root": str(root), "device": "cpu"}, sets)


def _finetune_pair(tiny_run, tmp_path: Path, *sets: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Fine-tuning in this process (one thread, as conftest sets) and ``spp finetune --nproc-per-node 2`` on
    copies of the tiny run (conftest; its saved config is E2E, model.dropout 0); returns the 2-process
    output and, per process count, the stage folder, its manifest, history and weights."""
    import shutil

    runs, _ = tiny_run
    out = {}
    for name in ("one", "two"):
        shutil.copytree(runs / "base", tmp_path / name / "r")
    finetune_stage.run(_finetune_cfg(tmp_path / "one", sets))
    two = _spp("finetune", "--runs-root", str(tmp_path / "two"), "--run", "r", "--device", "cpu",
               "--nproc-per-node", "2", *[a for s in sets for a in ("--set", s)])
    for name in ("one", "two"):
        folder = tmp_path / name / "r" / "03_finetune"
        out[name] = {"folder": folder, "manifest": read_manifest(folder / "MANIFEST.json"),
                     "history": json.loads((folder / "history.json").read_text()),
                     "weights": nets.load_checkpoint(folder / "model.pt")[0].state_dict()}
    return two, out


HELD_OUT_WINDOW = 1 / 64  # one of the 4 held-out batches x 16 windows of the tiny run


def _assert_same_finetuned_model(out: dict, trained: tuple[str, ...]) -> None:
    """Every weight within 1e-5 of the largest weight, and the difference under 1% of what fine-tuning changed
    in that tensor (0 where nothing changed: frozen layers stay exactly the pretrained ones); the ``trained``
    tensors did change. Held-out errors within one held-out window at every evaluation."""
    one, two = out["one"], out["two"]
    m1, m2 = one["manifest"].metrics, two["manifest"].metrics
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert two["manifest"].data["config"] == one["manifest"].data["config"]  # the process count is no parameter
    pretrained = nets.load_checkpoint(one["folder"].parent / "00_pretrain" / "model.pt")[0].state_dict()
    scale = max(float(w.abs().max()) for w in one["weights"].values())
    moved_tensors = set()
    for key, w1 in one["weights"].items():
        diff = float((two["weights"][key] - w1).abs().max())
        assert diff <= 1e-5 * scale, f"{key}: 2 processes differ from 1 by {diff:.3g} (largest weight {scale:.3g})"
        if key in pretrained and pretrained[key].shape == w1.shape:  # not the new fc8
            moved = float((w1 - pretrained[key]).abs().max())
            assert diff <= 0.01 * moved, f"{key}: 2 processes differ from 1 by {diff:.3g}, training moved {moved:.3g}"
            moved_tensors |= {key} if moved > 0 else set()
    assert all(any(k.startswith(prefix) for k in moved_tensors) for prefix in trained), sorted(moved_tensors)
    assert [h["iteration"] for h in two["history"]] == [h["iteration"] for h in one["history"]]
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert abs(h1["holdout_error"] - h2["holdout_error"]) <= HELD_OUT_WINDOW + 1e-12
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
    assert m2["initial_holdout_error"] == m1["initial_holdout_error"]  # the same weights, the same batches
    assert abs(m2["best_holdout_error"] - m1["best_holdout_error"]) <= HELD_OUT_WINDOW + 1e-12
    assert sorted(p.name for p in two["folder"].iterdir()) == [".lock", ".lock.rank1", "MANIFEST.json",
                                                               "history.json", "model.pt"]  # one set, no resume.pt


@pytest.mark.slow
def test_finetune_in_two_gloo_processes_gives_the_one_process_model(tiny_run, tmp_path):
    """Every rank draws the same chunk of batches from the same streams (the random scales of all its windows
    too) and pools its half of every batch; its summed loss, scaled by 2 / 16, makes DDP's average of the two
    gradients the gradient of the batch's mean, as in one process. With model.dropout 0 nothing else is random,
    so what remains is float32 rounding (sums over 8 + 8 windows, then the all-reduce): over 150 SGD steps
    measured 2.6e-7 of the largest weight (tolerance 1e-5) and 2e-6 of what training changed in fc6/fc7
    (tolerance 1%). The held-out batches are split between the ranks, whole, and the wrong counts summed: the
    errors at every evaluation were equal; allowed: one of the 64 held-out windows (a near tie of two logits
    could flip on other kernels). With dropout the ranks draw their own masks (seed + rank), so such a run is
    another sample of the same training, as another seed for the masks would be."""
    two, out = _finetune_pair(tiny_run, tmp_path)
    assert two.stdout.count("finetune: 150 iterations") == 1 and "finetune rank 1/2: done" in two.stdout
    assert two.stderr.count("iteration 150: held-out error") == 1  # only rank 0 logs
    _assert_same_finetuned_model(out, ("head.fc6", "head.fc7"))

    # A rerun, in two processes or one, is up to date: both ranks skip, rank 0 says so once, nothing is written.
    manifest = out["two"]["folder"] / "MANIFEST.json"
    written = manifest.stat().st_mtime_ns
    again = _spp("finetune", "--runs-root", str(tmp_path / "two"), "--run", "r", "--device", "cpu",
                 "--nproc-per-node", "2")
    assert again.stdout.count("up to date:") == 1 and again.stdout.count("finetune: 150 iterations") == 1
    assert finetune_stage.run(_finetune_cfg(tmp_path / "two")).skipped
    assert manifest.stat().st_mtime_ns == written


@pytest.mark.slow
def test_finetune_conv_in_two_gloo_processes_gives_the_one_process_model(tiny_run, tmp_path):
    """--conv: rank r runs the backbone on the batch's images r::2 (one each) after all of the batch's draws, so
    the windows are one process's; the trunk's first 4 layers (conv1 and its ReLU, norm, pool) stay frozen,
    each rank keeping its own memo of their output. Measured: 4e-9 of the largest weight apart after 4 steps,
    under 6e-4 of what training changed in conv2-conv5 (one float32 step of those weights: a conv LR of 1e-3
    moves them by ~7e-6), held-out errors equal."""
    sets = ("finetune.conv=true", "finetune.iters=4", "finetune.eval_every=2", "finetune.conv_frozen_layers=4")
    two, out = _finetune_pair(tiny_run, tmp_path, *sets)
    assert two.stdout.count("finetune: 4 iterations") == 1 and "finetune rank 1/2: done" in two.stdout
    _assert_same_finetuned_model(out, ("backbone.body.conv2", "backbone.body.conv5", "head.fc6"))
    assert out["two"]["manifest"].metrics["conv"] is True
