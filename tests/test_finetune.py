"""``spp finetune``: window selection, batch drawing, held-out split, optimiser groups, training on a separable toy
(held-out error falls, best snapshot, determinism, exact resume), and the stage end to end on a tiny devkit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stages import finetune
from stages.core import nets
from stages.core.config import FinetuneConfig
from stages.core.errors import SppError
from stages.core.roidb import image_rois
from stages.core.voc import Annotation

from conftest import E2E


# -- window selection ---------------------------------------------------------------------------------------------
def _roi_with_ious():
    """GT [0,0,100,10) of class 1; proposals [0,0,w,10) have IoU w/100 with it."""
    gt = Annotation("im", 200, 50, np.array([[0, 0, 100, 10.0]]), np.array([1]), np.array([False]))
    widths = [100, 60, 50, 49.9, 30, 10, 9.9, 0.5]
    proposals = np.array([[0, 0, w, 10] for w in widths], dtype=np.float64)
    return image_rois(gt, proposals, num_classes=3), widths


def test_select_windows_thresholds_and_labels():
    roi, widths = _roi_with_ious()
    fg, fg_labels, bg = finetune.select_windows(roi, 0.5, (0.1, 0.5))
    # Rows: 0 = GT, then proposals with IoU 1, .6, .5, .499, .3, .1, .099, .005.
    assert fg.tolist() == [0, 1, 2, 3]  # GT included; IoU exactly 0.5 is foreground
    assert fg_labels.tolist() == [2, 2, 2, 2]  # class 1 -> label 2 (0 is background)
    assert bg.tolist() == [4, 5, 6]  # [0.1, 0.5): 0.499, 0.3 and exactly 0.1; not 0.099 or 0.005


def _entries(n_images=6, n_fg=5, n_bg=20, flip=False, seed=0):
    rng = np.random.default_rng(seed)
    rois = []
    for k in range(n_images):
        gt_boxes = np.array([[10, 10, 60, 60.0]])
        fg = gt_boxes + rng.uniform(-4, 4, (n_fg, 4))  # IoU well above 0.5
        shift = rng.uniform(25, 40, (n_bg, 1)) * np.array([[1, 0, 1, 0]])
        bg = gt_boxes + shift  # IoU from 25/75 down to 10/90: background
        ann = Annotation(f"im{k}", 120, 120, gt_boxes, np.array([k % 2]), np.array([False]))
        rois.append(image_rois(ann, np.concatenate([fg, bg]), num_classes=2))
    return finetune.make_entries(rois, 0.5, (0.1, 0.5), flip), rois


def test_make_entries_adds_mirrors_with_the_same_windows():
    entries, rois = _entries(n_images=2, flip=True)
    assert [(e.image_id, e.flip) for e in entries] == [("im0", False), ("im0", True), ("im1", False), ("im1", True)]
    assert entries[0].fg_labels.tolist() == [1] * 6 and entries[2].fg_labels.tolist() == [2] * 6  # GT + 5
    np.testing.assert_array_equal(entries[0].bg_boxes, entries[1].bg_boxes)  # original coordinates; pooler mirrors


def test_draw_batches_composition():
    entries, _ = _entries(n_images=6, n_fg=5, n_bg=20)
    draw = finetune.draw_batches(entries, n_batches=4, batch_size=16, fg_fraction=0.25, rng=np.random.default_rng(1))
    assert sorted(draw.rows.tolist()) == list(range(64))  # every slot filled exactly once
    for b in range(4):
        in_batch = (draw.rows >= 16 * b) & (draw.rows < 16 * (b + 1))
        slots = draw.rows[in_batch] - 16 * b
        labels = draw.labels[in_batch]
        assert (labels[slots < 4] > 0).all() and (labels[slots >= 4] == 0).all()  # 4 fg first, then 12 bg
    for entry, box, label in zip(draw.entry, draw.boxes, draw.labels):
        source = entries[entry].fg_boxes if label > 0 else entries[entry].bg_boxes
        assert (np.abs(source - box).sum(1) == 0).any()  # drawn from that image's own windows
        if label > 0:
            assert label == entries[entry].fg_labels[0]
    # 16 fg windows needed, 36 exist: drawn without replacement.
    fg_keys = {(e, *b) for e, b, lab in zip(draw.entry, draw.boxes.tolist(), draw.labels) if lab > 0}
    assert len(fg_keys) == 16


def test_draw_batches_takes_images_until_oversampled_and_replaces_when_short():
    entries, _ = _entries(n_images=40, n_fg=5, n_bg=20)
    draw = finetune.draw_batches(entries, n_batches=1, batch_size=8, fg_fraction=0.25, rng=np.random.default_rng(0),
                                 oversample=2)
    # 2 fg x 2 = 4 needed: the first image already holds 6 fg, but 6 bg x 2 = 12 needs a second image.
    assert len(np.unique(draw.entry)) <= 2
    few, _ = _entries(n_images=1, n_fg=1, n_bg=2)
    draw = finetune.draw_batches(few, n_batches=3, batch_size=8, fg_fraction=0.5, rng=np.random.default_rng(0))
    assert len(draw.labels) == 24 and (draw.labels > 0).sum() == 12  # with replacement: 2 fg, 2 bg exist
    no_fg = [dataclasses.replace(e, fg_boxes=np.zeros((0, 4)), fg_labels=np.zeros(0, np.int64)) for e in few]
    with pytest.raises(SppError, match="no foreground"):
        finetune.draw_batches(no_fg, 1, 8, 0.25, np.random.default_rng(0))


def test_batch_split_and_holdout_split():
    assert finetune.batch_split(128, 0.25) == (32, 96)
    assert finetune.batch_split(10, 0.25) == (3, 7)  # 2.5 rounds half away from zero, like MATLAB int32()
    ids = [f"i{k}" for k in range(20)]
    train, held = finetune.split_holdout(ids, 0.1, seed=5)
    assert len(held) == 2 and len(train) == 18 and not set(train) & set(held)
    assert train == [i for i in ids if i in set(train)]  # input order kept
    assert finetune.split_holdout(ids, 0.1, seed=5) == (train, held)  # seeded
    assert finetune.split_holdout(ids, 0.1, seed=6) != (train, held)
    assert finetune.split_holdout(ids[:3], 0.01, 0)[1] != []  # at least one held out ...
    assert len(finetune.split_holdout(ids[:2], 0.9, 0)[0]) == 1  # ... and one left to train on
    assert finetune.split_holdout(ids, 0.0, 0) == (ids, [])
    with pytest.raises(SppError):
        finetune.split_holdout(ids, 1.0, 0)


def test_lr_schedule_and_parameter_groups():
    ft = FinetuneConfig(lr=1e-3, lr_steps=(30, 60), weight_decay=5e-4)
    assert [finetune.lr_at(ft, i) for i in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    head = nets.SppHead(2, (1, 2), fc_dim=8, num_classes=4)
    optimizer = finetune.make_optimizer(head, ft)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(head.fc6.weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(head.fc7.bias)]["lr"] == pytest.approx(2e-3)
    assert by_param[id(head.fc7.bias)]["weight_decay"] == 5e-4  # Caffe default decay on fc6/fc7 biases
    assert by_param[id(head.fc8.bias)]["weight_decay"] == 0.0 and by_param[id(head.fc8.bias)]["lr"] == pytest.approx(2e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(head.parameters()))
    finetune.set_lr(optimizer, 1e-5)
    assert by_param[id(head.fc8.bias)]["lr"] == pytest.approx(2e-5)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = finetune.make_optimizer(head, dataclasses.replace(ft, conv_lr_factor=0.1), backbone=trunk)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(trunk[0].weight)]["lr"] == pytest.approx(1e-4)
    assert by_param[id(trunk[1].weight)]["weight_decay"] == 0.0


# -- training on a separable toy ----------------------------------------------------------------------------------
TOY_CLASSES = 3
TOY_CHANNELS, TOY_PYRAMID = 2, (1, 2)  # D = 2 * (1 + 4) = 10
TOY_DIM = TOY_CHANNELS * 5


def _toy_entries(n_images, seed, prefix="t"):
    """Windows whose box says its label: x1 in [100*label, 100*label + 50); background x1 < 50."""
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(n_images):
        label = 1 + k % TOY_CLASSES
        x1 = 100 * label + rng.uniform(0, 50, 6)
        fg = np.stack([x1, np.zeros(6), x1 + 10, np.full(6, 10.0)], 1)
        bx = rng.uniform(0, 50, 18)
        bg = np.stack([bx, np.zeros(18), bx + 10, np.full(18, 10.0)], 1)
        entries.append(finetune.Entry(f"{prefix}{k}", 500, 20, False, fg, np.full(6, label, np.int64), bg))
    return entries


def _toy_pooler(calls=None):
    """Feature: a noisy one-hot of the label written in the box; a "random" scale adds extra noise."""
    def pool(entry, boxes, scale_choice, rng):
        if calls is not None:
            calls.append((entry.image_id, scale_choice, len(boxes)))
        label = np.floor(boxes[:, 0] / 100).astype(int)
        feats = np.zeros((len(boxes), TOY_DIM))
        feats[np.arange(len(boxes)), label] = 3.0
        jitter = np.random.default_rng(int(boxes[0, 0] * 1000)).normal(0, 0.3, feats.shape)
        if scale_choice == "random":
            jitter += rng.normal(0, 0.2, feats.shape)
        return torch.from_numpy(np.abs(feats + jitter)).float()
    return pool


def _toy_head(seed=0):
    torch.manual_seed(seed)
    head = nets.SppHead(TOY_CHANNELS, TOY_PYRAMID, fc_dim=32, num_classes=7)
    for layer in (head.fc6, head.fc7):  # stand-ins for pretrained layers: pass the signal on (He init)
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    head.replace_fc8(TOY_CLASSES + 1)
    return head


TOY_FT = FinetuneConfig(iters=120, lr=0.05, lr_steps=(90,), batch_size=16, fg_fraction=0.25, eval_every=30,
                        holdout_batches=6, checkpoint_every_s=0)


def _train_toy(ft=TOY_FT, **kwargs):
    head = _toy_head()
    result = finetune.train(head, _toy_entries(12, 0), _toy_entries(6, 1, "h"), kwargs.pop("pooler", _toy_pooler()),
                            TOY_DIM, ft, seed=0, device=torch.device("cpu"), progress=False, **kwargs)
    return head, result


def test_training_lowers_the_held_out_error_and_keeps_the_best_snapshot():
    head, result = _train_toy()
    m = result.metrics
    assert m["initial_holdout_error"] >= 0.25  # the new fc8 knows nothing (a quarter of the windows are fg)
    assert m["best_holdout_error"] < 0.05 < m["initial_holdout_error"]
    assert [h["iteration"] for h in result.history] == [30, 60, 90, 120]
    errors = [h["holdout_error"] for h in result.history]
    assert m["best_holdout_error"] == min(errors) and m["best_iteration"] == 30 * (1 + errors.index(min(errors)))
    assert result.history[-1]["lr"] == pytest.approx(0.005)
    assert set(result.best_state) == {f"head.{k}" for k in head.state_dict()}
    assert result.best_state["head.fc8.weight"].shape == (TOY_CLASSES + 1, 32)
    best = {k.split(".", 1)[1]: v for k, v in result.best_state.items()}
    head.load_state_dict(best)
    holdout = finetune.pool_draw(finetune.draw_batches(_toy_entries(6, 1, "h"), 6, 16, 0.25, np.random.default_rng(0)),
                                 _toy_entries(6, 1, "h"), _toy_pooler(), TOY_DIM, "best", np.random.default_rng(0), "cpu")
    error, _ = finetune.classification_error(head, *holdout, batch_size=16)
    assert error < 0.1  # the kept snapshot classifies held-out windows it never saw


def test_training_is_deterministic_and_uses_random_scales_for_training_only():
    calls = []
    _, first = _train_toy(pooler=_toy_pooler(calls))
    _, second = _train_toy()
    assert all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)
    assert {scale for image, scale, _ in calls if image.startswith("t")} == {"random"}
    assert {scale for image, scale, _ in calls if image.startswith("h")} == {"best"}
    assert {image for image, _, _ in calls[:6]} == {f"h{k}" for k in range(6)}  # held-out pooled once, first
    assert sum(image.startswith("h") for image, _, _ in calls) == 6


def test_training_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    ft = dataclasses.replace(TOY_FT, iters=40, eval_every=10)
    _, uninterrupted = _train_toy(ft, chunk_iters=6)
    resume = tmp_path / "resume.pt"
    real_set_lr, count = finetune.set_lr, [0]

    def crash_at_iteration_15(optimizer, lr):
        count[0] += 1
        if count[0] == 15:
            raise KeyboardInterrupt
        real_set_lr(optimizer, lr)

    monkeypatch.setattr(finetune.training, "set_lr", crash_at_iteration_15)
    with pytest.raises(KeyboardInterrupt):
        _train_toy(ft, chunk_iters=6, resume_path=resume, resume_key="k")
    monkeypatch.setattr(finetune.training, "set_lr", real_set_lr)
    assert torch.load(resume, weights_only=True)["iteration"] == 12  # the last chunk end before the crash
    _, resumed = _train_toy(ft, chunk_iters=6, resume_path=resume, resume_key="k")
    assert resumed.metrics["resumed_from"] == 12
    assert [h["holdout_error"] for h in resumed.history] == [h["holdout_error"] for h in uninterrupted.history]
    assert all(torch.equal(resumed.best_state[k], uninterrupted.best_state[k]) for k in uninterrupted.best_state)
    _, fresh = _train_toy(ft, chunk_iters=6, resume_path=resume, resume_key="other config")
    assert fresh.metrics["resumed_from"] == 0  # a resume point of another config is ignored


def test_non_finite_loss_stops_with_one_line():
    def bad_pooler(entry, boxes, scale_choice, rng):
        return torch.full((len(boxes), TOY_DIM), float("inf"))

    with pytest.raises(SppError, match="loss became nan"):
        _train_toy(dataclasses.replace(TOY_FT, holdout_batches=0), pooler=bad_pooler)


def test_without_held_out_images_the_last_iteration_is_kept():
    head = _toy_head()
    result = finetune.train(head, _toy_entries(6, 0), [], _toy_pooler(), TOY_DIM,
                            dataclasses.replace(TOY_FT, iters=20), seed=0, device=torch.device("cpu"),
                            progress=False)
    assert result.metrics["best_holdout_error"] is None and result.metrics["best_iteration"] == 20
    assert all(torch.equal(result.best_state[f"head.{k}"], v) for k, v in head.state_dict().items())


def test_ranks_pool_their_rows_of_the_same_draw():
    """torchrun ranks pool their own rows of every batch (rank_rows) of one draw: together they give the whole
    buffer, and each rank's random stream ends where pooling all of it leaves it, so the next draw is the same."""
    def pooler(entry, boxes, scale_choice, rng, keep=None):  # a random "scale" per window, as the real poolers
        feats = torch.from_numpy(boxes[:, :1] + rng.integers(0, 2, (len(boxes), 1))).float().repeat(1, TOY_DIM)
        return feats if keep is None else feats[torch.from_numpy(keep)]

    entries = _toy_entries(5, 0)
    draw = finetune.draw_batches(entries, 3, 10, 0.3, np.random.default_rng(1))
    whole_rng = np.random.default_rng(2)
    whole, labels = finetune.pool_draw(draw, entries, pooler, TOY_DIM, "random", whole_rng, "cpu")
    assert [finetune.rank_rows(10, rank, 3) for rank in range(3)] == [(0, 3), (3, 6), (6, 10)]
    in_batch = np.arange(30) % 10
    for rank in range(3):
        lo, hi = finetune.rank_rows(10, rank, 3)
        part = (in_batch >= lo) & (in_batch < hi)
        rng = np.random.default_rng(2)
        mine, my_labels = finetune.pool_draw(draw, entries, pooler, TOY_DIM, "random", rng, "cpu", part)
        assert torch.equal(mine, whole[torch.from_numpy(part)])
        assert torch.equal(my_labels, labels[torch.from_numpy(part)])
        assert rng.bit_generator.state == whole_rng.bit_generator.state


# -- the stage end to end on a tiny devkit (conftest's tiny_run) --------------------------------------------------
def _stage_cfg(tiny_run, name, **sets):
    import shutil

    from stages.core.config import build_config

    runs, devkit = tiny_run
    if not (runs / name).exists():
        shutil.copytree(runs / "base", runs / name)
    return build_config(None, {**E2E, "runs_root": str(runs), "run": name, "data.voc_root": str(devkit),
                               **{k.replace("__", "."): v for k, v in sets.items()}})


def test_stage_writes_a_k_plus_1_way_checkpoint_and_learns(tiny_run):
    import json

    from stages.core.artifacts import Run

    cfg = _stage_cfg(tiny_run, "e2e")
    result = finetune.run(cfg)
    m = result.manifest.metrics
    folder = Run(cfg.run_dir).stage_dir("finetune")
    model, meta = nets.load_checkpoint(folder / "model.pt", expect_backbone="zf5")
    assert model.head.fc8.out_features == 3 and meta["num_classes"] == 3
    assert meta["dropout"] == cfg.model.dropout == 0.0  # model.dropout, not the pretrained checkpoint's 0.3
    assert meta["class_names"] == ["__background__", "red", "green"] and meta["finetuned"] is True
    pretrained, _ = nets.load_checkpoint(Run(cfg.run_dir).stage_dir("pretrain") / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                  pretrained.backbone.state_dict().values()))  # conv frozen
    assert not torch.equal(model.head.fc6.weight, pretrained.head.fc6.weight)  # fc6 fine-tuned
    # 4 training images (+ mirrors), 2 held out; GT rows are foreground windows.
    assert (m["train_images"], m["holdout_images"], m["train_entries"], m["flip_used"]) == (4, 2, 8, True)
    assert m["initial_holdout_error"] > 0.25 > m["best_holdout_error"]  # beats the all-background answer
    history = json.loads((folder / "history.json").read_text())
    assert [h["iteration"] for h in history] == [30, 60, 90, 120, 150]
    assert meta["finetune_iteration"] == m["best_iteration"]
    assert m["best_holdout_error"] == min(h["holdout_error"] for h in history)
    assert "held-out error" in result.summary and not (folder / finetune.RESUME_FILE).exists()
    again = finetune.run(cfg)
    assert again.skipped and again.manifest.fingerprint == result.manifest.fingerprint


def test_learning_subset_is_seeded_nested_and_ordered():
    rois = [f"i{k}" for k in range(20)]
    five, ten = finetune.learning_subset(rois, 5, seed=3), finetune.learning_subset(rois, 10, seed=3)
    assert len(five) == 5 and len(ten) == 10 and set(five) <= set(ten)  # nested: a learning curve adds images
    assert five == [r for r in rois if r in set(five)]  # input order kept
    assert finetune.learning_subset(rois, 5, seed=3) == five and finetune.learning_subset(rois, 5, seed=4) != five
    assert finetune.learning_subset(rois, 0, seed=3) == rois == finetune.learning_subset(rois, 99, seed=3)


def test_train_images_limits_what_the_stage_learns_from(tiny_run):
    cfg = _stage_cfg(tiny_run, "subset", finetune__iters=4, finetune__eval_every=2, finetune__train_images=2)
    assert finetune.run(cfg).manifest.metrics["train_images"] == 2


def test_stage_is_deterministic_and_reruns_on_config_change(tiny_run):
    from stages.core.artifacts import Run

    weights = []
    for name in ("det_a", "det_b"):
        cfg = _stage_cfg(tiny_run, name, finetune__iters=20, finetune__eval_every=10)
        finetune.run(cfg)
        weights.append(torch.load(Run(cfg.run_dir).stage_dir("finetune") / "model.pt", weights_only=True))
    assert all(torch.equal(v, weights[1]["state_dict"][k]) for k, v in weights[0]["state_dict"].items())
    cfg = _stage_cfg(tiny_run, "det_a", finetune__iters=21, finetune__eval_every=10)
    assert not finetune.run(cfg).skipped


def test_conv_mode_trains_the_backbone_too(tiny_run):
    from stages.core.artifacts import Run

    cfg = _stage_cfg(tiny_run, "conv", finetune__conv=True, finetune__iters=3, finetune__eval_every=3,
                     finetune__holdout_batches=1, finetune__conv_lr_factor=1.0)
    result = finetune.run(cfg)
    assert "features" not in result.manifest.data["inputs"]  # conv mode reads images, not the cache
    model, meta = nets.load_checkpoint(Run(cfg.run_dir).stage_dir("finetune") / "model.pt")
    pretrained, _ = nets.load_checkpoint(Run(cfg.run_dir).stage_dir("pretrain") / "model.pt")
    assert meta["conv_finetuned"] is True and model.head.fc8.out_features == 3
    assert not torch.equal(model.backbone.body.conv1.weight, pretrained.backbone.body.conv1.weight)
    # Its fc layers expect its own conv5: ftfc7 reads a cache made by its conv layers, fc7 the pretrained one.
    from stages import extract_features
    from stages.core import fcfeatures
    from stages.core.errors import StageInputMissing
    from stages.core.features import cache_of, features_for
    from stages.core.voc import VocDataset

    run = Run(cfg.run_dir)
    assert fcfeatures.conv_source(run, "ftfc7") == "finetune" and fcfeatures.conv_source(run, "fc7") == "pretrain"
    with pytest.raises(StageInputMissing, match=r"run `spp extract-features --run conv --runs-root \S+ --split trainval --conv-from finetune`"):
        fcfeatures.features_manifest(run, "trainval", "ftfc7")
    extract_features.run(cfg, "trainval", conv_from="finetune")
    manifest = fcfeatures.features_manifest(run, "trainval", "ftfc7")
    cache = cache_of(manifest)
    assert manifest.folder.name == "trainval+ftconv"
    assert fcfeatures.features_manifest(run, "trainval", "fc7").folder.name == "trainval"
    image = VocDataset(cfg.data.voc_root).load_image("im2")
    with torch.inference_mode():
        direct = model.backbone.eval()(nets.preprocess(image, 128, model.backbone.spec)[None])[0]
    assert torch.allclose(cache.maps("im2", scales_subset=(128,))[0], direct, rtol=1e-2, atol=1e-2)  # float16
    assert not torch.allclose(features_for(run, "trainval").maps("im2", scales_subset=(128,))[0], direct,
                              rtol=1e-2, atol=1e-2)
    assert fcfeatures.load_feature_nets(run, "ftfc7", cfg, device="cpu")[0]["finetuned"] is not None
    # A model fine-tuned without --conv has no conv layers of its own to extract with.
    plain = _stage_cfg(tiny_run, "e2e")
    if not Run(plain.run_dir).manifest_path("finetune").exists():
        finetune.run(plain)
    with pytest.raises(SppError, match=r"model\.pt: this model was fine-tuned without --conv"):
        extract_features.run(plain, "trainval", conv_from="finetune")


def test_conv_frozen_layers_stay_put_and_the_memo_changes_nothing(tiny_run):
    """--conv with the first layers frozen: those keep the pretrained weights, the rest learns, and keeping the
    frozen output in memory gives bit-identical weights to recomputing it every step (it is only a speed-up)."""
    from stages.core.artifacts import Run

    states, metrics = [], []
    for name, memo_mb in (("frozen_memo", 64), ("frozen_nomemo", 0)):
        cfg = _stage_cfg(tiny_run, name, finetune__conv=True, finetune__iters=4, finetune__eval_every=2,
                         finetune__holdout_batches=1, finetune__conv_lr_factor=1.0,
                         finetune__conv_frozen_layers=4, finetune__conv_memo_mb=memo_mb)
        metrics.append(finetune.run(cfg).manifest.metrics)
        states.append(nets.load_checkpoint(Run(cfg.run_dir).stage_dir("finetune") / "model.pt")[0].state_dict())
    pretrained_net = nets.load_checkpoint(Run(cfg.run_dir).stage_dir("pretrain") / "model.pt")[0]
    pretrained = pretrained_net.state_dict()
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    first_four = {f"backbone.body.{name}." for name in list(pretrained_net.backbone.body._modules)[:4]}
    body = [k for k in pretrained if k.startswith("backbone.body.")]
    frozen = [k for k in body if any(k.startswith(prefix) for prefix in first_four)]
    trained = [k for k in body if k not in frozen and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(states[0][k], pretrained[k]) for k in frozen)
    assert all(not torch.equal(states[0][k], pretrained[k]) for k in trained)
    # 4 steps x 2 images + 3 held-out evaluations: with the memo most lookups are hits, without it none are.
    assert metrics[0]["frozen_memo_hits"] > 0 and metrics[0]["frozen_memo_mb"] > 0
    assert metrics[1]["frozen_memo_hits"] == 0 and metrics[1]["frozen_memo_mb"] == 0
    assert metrics[0]["frozen_memo_hits"] + metrics[0]["frozen_memo_misses"] == metrics[1]["frozen_memo_misses"]


def test_frozen_memo_keeps_within_its_budget_and_refuses_a_frozen_whole_trunk():
    memo = finetune.FrozenMemo(budget_mb=3 * 4 / 2**20)  # room for three float32 values
    made = []
    for key in ("a", "b", "c", "d", "a"):
        memo.get(key, lambda key=key: made.append(key) or torch.zeros(1))
    assert made == ["a", "b", "c", "d", "a"] and memo.bytes == 12  # "a" was dropped first (least recent)
    assert memo.get("d", lambda: torch.ones(1)).item() == 0 and memo.hits == 1
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(SppError, match="conv_frozen_layers = 2, but the trunk has 2 layers"):
        finetune.split_trunk(body, 2)
    frozen, trainable = finetune.split_trunk(body, 1)
    assert not any(p.requires_grad for p in frozen.parameters()) and len(trainable) == 1


def test_conv_batches_keep_the_foreground_fraction_when_images_have_few_foreground_windows(tiny_run):
    """--conv draws windows from a few images per batch; an image with 3 foreground windows gives them and 9
    background ones (96/32 per foreground window), not 3 + 125 (which taught the net to call all background)."""
    from stages.core.voc import VocDataset

    cfg = _stage_cfg(tiny_run, "e2e")
    model = nets.build_sppnet("zf5", fc_dim=32, num_classes=3, dropout=0.0, class_names=("a", "b", "c"))
    dataset = VocDataset(cfg.data.voc_root)
    _, live_batch = finetune._live_poolers(model, dataset, model.backbone.spec, (64, 96), (1, 2), "code", "cpu",
                                           images_per_batch=2)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 30, (200, 2))
    background = np.hstack([corners, corners + rng.uniform(8, 30, (200, 2))])
    few = finetune.Entry("im1", 80, 64, False, np.array([[10., 10, 40, 40], [12, 10, 42, 40], [10, 12, 40, 42]]),
                         np.array([1, 1, 2]), background)
    empty = finetune.Entry("im2", 80, 64, False, np.zeros((0, 4)), np.zeros(0, np.int64), few.bg_boxes[:50])
    features, labels = live_batch([few, empty], 32, 96, rng)
    assert features.shape == (24, 256 * 5) and labels.shape == (24,)  # two draws of `few`: 2 x (3 + 9)
    assert (labels > 0).sum() == 6 and sorted(labels[labels > 0].tolist()) == [1, 1, 1, 1, 2, 2]
    # Without foreground anywhere (fg_fraction 0): background only, the batch split between the images.
    features, labels = live_batch([empty], 0, 96, rng)
    assert features.shape[0] == 96 and (labels == 0).all()
    # torchrun ranks: rank r runs the backbone on the images r::2 of the same draws; together, one process's batch.
    whole_rng = np.random.default_rng(5)
    whole = live_batch([few, empty], 32, 96, whole_rng)
    for rank in (0, 1):
        rank_rng = np.random.default_rng(5)
        features, labels = live_batch([few, empty], 32, 96, rank_rng, rank, 2)
        assert torch.equal(features, whole[0][12 * rank:12 * rank + 12])
        assert torch.equal(labels, whole[1][12 * rank:12 * rank + 12])
        assert rank_rng.bit_generator.state == whole_rng.bit_generator.state


def test_stage_input_errors(tiny_run, tmp_path):
    from stages.core.config import build_config
    from stages.core.errors import StageInputMissing

    with pytest.raises(SppError, match="must not see the test split"):
        finetune.run(_stage_cfg(tiny_run, "errors", data__test_split="trainval"))
    _, devkit = tiny_run
    empty = build_config(None, {**E2E, "runs_root": str(tmp_path), "run": "empty", "data.voc_root": str(devkit)})
    with pytest.raises(StageInputMissing, match="spp pretrain"):
        finetune.run(empty)
