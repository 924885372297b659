"""``spp pretrain``: checkpoint + meta, skip, multi-size alternation, LR schedule, exact resume (in-process and
after killing a real process), NaN stop, --init from a trunk state dict / an sppnet checkpoint, bad inputs,
torchrun with 2 CPU ranks."""
from __future__ import annotations

import dataclasses

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages import pretrain
from stages.core import nets
from stages.core.artifacts import Run, read_manifest
from stages.core.config import build_config
from stages.core.errors import InputError, SppError

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("bar", "disc", "square")


def _draw(shape: str, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(40, 57))
    image = (rng.random((side, side + int(rng.integers(-6, 7)), 3)) * 90).astype(np.uint8)
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    c, r = side // 2 + int(rng.integers(-3, 4)), int(rng.integers(side // 5, side // 3))
    if shape == "disc":
        cv2.circle(image, (c, c), r, colour, -1)
    elif shape == "square":
        cv2.rectangle(image, (c - r, c - r), (c + r, c + r), colour, -1)
    else:
        cv2.rectangle(image, (c - r, c - r // 4), (c + r, c + r // 4), colour, -1)
    return image


def make_tree(root: Path, classes=SHAPES, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """An ImageFolder tree of small random-shape JPEGs: train/<class>/*.jpg and val/<class>/*.jpg."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                cv2.imwrite(str(folder / f"{k:03d}.jpg"), cv2.cvtColor(_draw(name, rng), cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("cls") / "shapes")


TINY = {"device": "cpu", "pretrain.sizes": [48, 64], "pretrain.epochs": 1, "pretrain.batch_size": 8,
        "pretrain.workers": 0, "pretrain.lr": 0.01, "pretrain.lr_steps": [], "pretrain.crop_scale": [0.5, 1.0],
        "model.fc_dim": 64}


def tiny_cfg(runs: Path, data: Path, run: str = "r", **extra):
    return build_config("synth", {**TINY, "runs_root": str(runs), "run": run, "pretrain.data": str(data),
                                  **{k.replace("__", "."): v for k, v in extra.items()}})


def _model_path(cfg) -> Path:
    return Run(cfg.run_dir).stage_dir("pretrain") / pretrain.MODEL_FILE


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- pure schedule functions -----------------------------------------------------------------------------------
def test_lr_is_divided_by_ten_at_each_step():
    lrs = [pretrain.epoch_lr(0.01, (8, 11), e) for e in range(13)]
    assert lrs[:8] == [0.01] * 8
    assert lrs[8:11] == pytest.approx([1e-3] * 3)
    assert lrs[11:] == pytest.approx([1e-4] * 2)


def test_sizes_alternate_by_whole_epochs():
    assert [pretrain.epoch_size((180, 224), e) for e in range(5)] == [180, 224, 180, 224, 180]


# -- one epoch: checkpoint, meta, manifest, skip ----------------------------------------------------------------
def test_one_epoch_writes_a_loadable_checkpoint_and_is_skipped_when_rerun(tmp_path, tree):
    cfg = tiny_cfg(tmp_path, tree)
    result = pretrain.run(cfg)
    assert not result.skipped
    model, meta = nets.load_checkpoint(_model_path(cfg), expect_backbone="zf5")
    assert meta["class_names"] == list(SHAPES)
    assert meta["dropout"] == cfg.pretrain.dropout and meta["width"] == cfg.model.width
    assert meta["epochs"] == 1 and 0.0 <= meta["val_accuracy"] <= 1.0
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, len(SHAPES))
    manifest = read_manifest(Run(cfg.run_dir).manifest_path("pretrain"))
    m = manifest.metrics
    assert m["val_accuracy_per_epoch"] == [meta["val_accuracy"]] and m["chance_accuracy"] == pytest.approx(1 / 3)
    assert m["train_images"] == 24 and m["val_images"] == 12 and m["size_per_epoch"] == [48]
    assert manifest.data["config"]["pretrain"]["epochs"] == 1
    assert "classification_set" in manifest.data["inputs"]
    assert (Run(cfg.run_dir).stage_dir("pretrain") / pretrain.RESUME_FILE).exists()

    again = pretrain.run(cfg)
    assert again.skipped and again.manifest.fingerprint == manifest.fingerprint


def test_multi_size_training_feeds_each_epoch_at_its_size(tmp_path, tree, monkeypatch):
    seen: list[tuple[bool, tuple[int, int]]] = []
    original = nets.SppNet.forward

    def spy(self, images):
        seen.append((self.training, tuple(images.shape[-2:])))
        return original(self, images)

    monkeypatch.setattr(nets.SppNet, "forward", spy)
    cfg = tiny_cfg(tmp_path, tree, pretrain__epochs=3)
    result = pretrain.run(cfg)
    train_sizes = [hw for training, hw in seen if training]
    runs = [train_sizes[0]] + [b for a, b in zip(train_sizes, train_sizes[1:]) if a != b]
    assert runs == [(48, 48), (64, 64), (48, 48)]  # whole epochs, alternating
    assert len(train_sizes) == 3 * 3  # 24 images / batch 8, three epochs
    assert {hw for training, hw in seen if not training} == {(64, 64)}  # validation at the largest size
    assert result.manifest.metrics["size_per_epoch"] == [48, 64, 48]


# -- resume ---------------------------------------------------------------------------------------------------
def test_resuming_after_epoch_one_gives_the_uninterrupted_weights(tmp_path, tree):
    straight = tiny_cfg(tmp_path, tree, run="straight", pretrain__epochs=2)
    pretrain.run(straight)
    first = tiny_cfg(tmp_path, tree, run="resumed", pretrain__epochs=1)
    pretrain.run(first)
    resumed = pretrain.run(tiny_cfg(tmp_path, tree, run="resumed", pretrain__epochs=2))
    assert resumed.manifest.metrics["epochs"] == 2
    model_straight, _ = nets.load_checkpoint(_model_path(straight))
    model_resumed, meta_resumed = nets.load_checkpoint(_model_path(first))  # same run folder as `first`
    assert _same_weights(model_straight.state_dict(), model_resumed.state_dict())
    assert meta_resumed["val_accuracy"] == resumed.manifest.metrics["val_accuracy"]
    assert resumed.manifest.metrics["val_accuracy_per_epoch"] == \
        read_manifest(Run(straight.run_dir).manifest_path("pretrain")).metrics["val_accuracy_per_epoch"]


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, tree, caplog):
    pretrain.run(tiny_cfg(tmp_path, tree, pretrain__epochs=1))
    result = pretrain.run(tiny_cfg(tmp_path, tree, pretrain__epochs=1, pretrain__lr=0.02))
    assert "another config" in caplog.text  # a warning: the CLI prints it as `warning: ...` on stderr
    assert result.manifest.metrics["epochs"] == 1 and len(result.manifest.metrics["lr_per_epoch"]) == 1


def _cli(runs: Path, data: Path, epochs: int, *more: str) -> list[str]:
    return [sys.executable, "-m", "sppcli", "pretrain", "--runs-root", str(runs), "--run", "r", "--device", "cpu",
            "--data", str(data), "--epochs", str(epochs), "--set", "pretrain.sizes=[48, 64]",
            "--set", "pretrain.batch_size=8", "--set", "pretrain.lr_steps=[2]", "--set", "model.fc_dim=64",
            "--set", "pretrain.crop_scale=[0.5, 1.0]", *more]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SPP_PROGRESS": "0"}  # no bar lines


STOP_AFTER_FIRST_CHECKPOINT = """
import sys, time
import stages.pretrain as stage
real_save = stage._torch_save_atomic

def save(obj, path):
    real_save(obj, path)
    if path.name == stage.RESUME_FILE:
        print("SAVED", flush=True)
        time.sleep(600)

stage._torch_save_atomic = save
sys.argv = ["spp", *sys.argv[1:]]
from sppcli.cli import main
main()
"""


@pytest.mark.slow
def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path, tree):
    # Worker processes on: their augmentation RNG must come from (seed, epoch), not from the process's history.
    args = ("--set", "pretrain.workers=1")
    straight = subprocess.run(_cli(tmp_path / "straight", tree, 3, *args), env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    # The child stops itself once its first epoch's checkpoint is on disk and waits to be killed, so a slow CI
    # machine cannot let it finish first.
    command = _cli(tmp_path / "killed", tree, 3, *args)
    proc = subprocess.Popen([sys.executable, "-c", STOP_AFTER_FIRST_CHECKPOINT, *command[3:]], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stage = tmp_path / "killed" / "r" / "00_pretrain"
    assert not (stage / "MANIFEST.json").exists()
    assert torch.load(stage / pretrain.RESUME_FILE, weights_only=True)["epoch"] < 3

    resumed = subprocess.run(_cli(tmp_path / "killed", tree, 3, *args), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stderr
    ma, meta_a = nets.load_checkpoint(tmp_path / "straight" / "r" / "00_pretrain" / "model.pt")
    mb, meta_b = nets.load_checkpoint(stage / "model.pt")
    assert _same_weights(ma.state_dict(), mb.state_dict())
    assert meta_a["val_accuracy"] == meta_b["val_accuracy"]


# -- failures -------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tree, monkeypatch):
    calls = {"n": 0}
    original = pretrain._classification_loss

    def nan_on_fifth(logits, labels):  # 3 iterations per epoch: the 5th is epoch 2, iteration 2
        calls["n"] += 1
        loss = original(logits, labels)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(pretrain.training, "_classification_loss", nan_on_fifth)
    cfg = tiny_cfg(tmp_path, tree, pretrain__epochs=3)
    with pytest.raises(SppError) as err:
        pretrain.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message and "epoch 2, iteration 2/3" in message
    stage = Run(cfg.run_dir).stage_dir("pretrain")
    assert torch.load(stage / pretrain.RESUME_FILE, weights_only=True)["epoch"] == 1
    assert not (stage / "MANIFEST.json").exists() and not (stage / pretrain.MODEL_FILE).exists()


def test_huge_lr_is_caught_as_non_finite(tmp_path, tree):
    cfg = tiny_cfg(tmp_path, tree, pretrain__lr=1e30, pretrain__epochs=2)
    with pytest.raises(SppError, match="non-finite"):
        pretrain.run(cfg)


def test_adamw_option_trains_and_an_unknown_optimizer_is_refused(tmp_path, tree):
    cfg = tiny_cfg(tmp_path, tree, pretrain__optimizer="adamw")
    pretrain.run(cfg)
    state = torch.load(Run(cfg.run_dir).stage_dir("pretrain") / pretrain.RESUME_FILE, weights_only=True)
    assert all("exp_avg" in s for s in state["optimizer"]["state"].values())
    with pytest.raises(SppError, match="pretrain.optimizer: 'adam' is not one of sgd, adamw"):
        pretrain.run(tiny_cfg(tmp_path, tree, run="other", pretrain__optimizer="adam"))
    assert not Run(tmp_path / "other").stage_dir("pretrain").exists()
    # The check lives in the config type: a config built with the library's own dataclasses meets it too.
    with pytest.raises(SppError, match="pretrain.optimizer: 'adam' is not one of sgd, adamw"):
        dataclasses.replace(cfg, run="other", pretrain=dataclasses.replace(cfg.pretrain, optimizer="adam"))


def test_other_datasets_need_a_classification_set(tmp_path):
    cfg = build_config("voc2007-zf5", {"runs_root": str(tmp_path), "device": "cpu", "pretrain.epochs": 1})
    with pytest.raises(SppError, match="--data"):
        pretrain.run(cfg)


def test_missing_val_folder_is_one_line_naming_the_tree(tmp_path):
    root = make_tree(tmp_path / "t", train=1, val=1)
    for path in (root / "val").rglob("*.jpg"):
        path.unlink()
    for folder in (root / "val").iterdir():
        folder.rmdir()
    with pytest.raises(InputError) as err:
        pretrain.run(tiny_cfg(tmp_path, root))
    assert str(root / "val") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_one_line_naming_the_file(tmp_path, workers):
    root = make_tree(tmp_path / "t", train=2, val=1)
    bad = root / "train" / "disc" / "000.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError) as err:
        pretrain.run(tiny_cfg(tmp_path, root, pretrain__workers=workers, pretrain__batch_size=6))
    message = str(err.value)
    assert str(bad) in message and "\n" not in message and "Traceback" not in message


# -- init -----------------------------------------------------------------------------------------------------
def test_zero_epochs_from_a_trunk_state_dict_keeps_those_weights(tmp_path, tree):
    torch.manual_seed(5)
    trunk = torch.nn.Sequential(*build_torchvision_mobilenet_features())
    weights = tmp_path / "trunk.pt"
    torch.save(trunk.state_dict(), weights)
    cfg = tiny_cfg(tmp_path, tree, pretrain__epochs=0, pretrain__init=str(weights), model__backbone="mobilenet_v2",
                   model__width=1.0)  # the synth preset narrows ZF-5 only
    result = pretrain.run(cfg)
    model, meta = nets.load_checkpoint(_model_path(cfg), expect_backbone="mobilenet_v2")
    expected = nets.build_backbone("mobilenet_v2", str(weights)).state_dict()
    assert _same_weights(model.backbone.state_dict(), expected)
    assert not _same_weights(nets.build_backbone("mobilenet_v2").state_dict(), expected)  # really loaded
    assert meta["epochs"] == 0 and meta["init_kind"] == "state_dict"
    assert result.manifest.metrics["val_accuracy"] is not None and result.manifest.metrics["epochs"] == 0
    assert result.manifest.data["inputs"]["init"]["sha256"]


def build_torchvision_mobilenet_features():
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None).features


def test_zero_epochs_without_data_from_a_trunk_is_allowed_for_voc(tmp_path):
    torch.manual_seed(6)
    weights = tmp_path / "trunk.pt"
    torch.save(build_torchvision_mobilenet_features().state_dict(), weights)
    cfg = build_config("voc2007-mobilenet", {"runs_root": str(tmp_path), "device": "cpu", "pretrain.epochs": 0,
                                             "model.weights": str(weights), "model.fc_dim": 64})
    result = pretrain.run(cfg)
    model, meta = nets.load_checkpoint(_model_path(cfg), expect_backbone="mobilenet_v2")
    assert meta["class_names"] == [] and result.manifest.metrics["val_accuracy"] is None
    assert _same_weights(model.backbone.state_dict(), nets.build_backbone("mobilenet_v2", str(weights)).state_dict())


def test_init_from_an_sppnet_checkpoint_with_other_classes_replaces_fc8(tmp_path, tree):
    first = tiny_cfg(tmp_path, tree, run="first")
    pretrain.run(first)
    other = make_tree(tmp_path / "two", classes=("disc", "square"), train=2, val=2, seed=3)
    cfg = tiny_cfg(tmp_path, other, run="second", pretrain__epochs=0, pretrain__init=str(_model_path(first)))
    pretrain.run(cfg)
    before, _ = nets.load_checkpoint(_model_path(first))
    after, meta = nets.load_checkpoint(_model_path(cfg))
    assert meta["class_names"] == ["disc", "square"] and meta["fc8"] == "new"
    assert after.head.fc8.out_features == 2
    assert _same_weights(before.backbone.state_dict(), after.backbone.state_dict())
    assert torch.equal(before.head.fc6.weight, after.head.fc6.weight)
    assert torch.equal(before.head.fc7.weight, after.head.fc7.weight)


def test_init_that_is_not_weights_is_one_line(tmp_path, tree):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(SppError) as err:
        pretrain.run(tiny_cfg(tmp_path, tree, pretrain__init=str(junk)))
    assert str(junk) in str(err.value) and "\n" not in str(err.value)


# -- torchrun -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_with_two_cpu_ranks(tmp_path, tree):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "--", "sppcli"] + \
        _cli(tmp_path, tree, 2)[3:]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "r" / "00_pretrain" / "MANIFEST.json")
    assert manifest.metrics["world_size"] == 2 and manifest.metrics["epochs"] == 2
    assert manifest.metrics["val_images"] == 12  # every val image scored once over both ranks
    model, meta = nets.load_checkpoint(tmp_path / "r" / "00_pretrain" / "model.pt")
    assert meta["class_names"] == list(SHAPES)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert done.stderr.count("pretrain epoch 1/2") == 1  # only rank 0 reports (a log line: stderr)
