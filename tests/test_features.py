"""conv5 feature cache: extraction to HDF5 (round trip, attributes, flips, batching), resume after a kill,
torchrun sharding, corrupt files, and FeatureCache.pooled against spp.pool_windows on the maps themselves."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stages import extract_features as stage
from stages.core import nets, spp
from stages.core.artifacts import CONV_LAYERS_PART, Run, sha256_file
from stages.core.boxes import flip_boxes
from stages.core.config import build_config
from stages.core.errors import SppError, StageInputMissing
from stages.core.features import (COMPLETE, FeatureCache, FeatureWriter, features_for, map_name, partial_path)
from stages.core.voc import VocDataset

from conftest import write_devkit

REPO = Path(__file__).resolve().parents[1]
SCALES = (64, 96)
SIZES = {"img0": (64, 80), "img1": (72, 56), "img2": (64, 80)}  # two share a size (batched), one portrait


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = {}
    for image_id, (height, width) in SIZES.items():
        pixels = (rng.random((height, width, 3)) * 80).astype(np.uint8)
        pixels[8:40, 10:44] = (210, 40, 30)
        pixels[42:60, 30:52] = (20, 190, 60)
        images[image_id] = (pixels, [("red", (11, 9, 44, 40), False), ("green", (31, 43, 52, 60), False)])
    return write_devkit(tmp_path_factory.mktemp("features") / "devkit", images,
                        {"train": list(SIZES), "test": ["img1", "img2"]}, classes=("red", "green"))


def make_config(root: Path, devkit: Path, run: str = "r", **sets):
    overrides = {"runs_root": str(root), "run": run, "device": "cpu", "data.dataset": "synth",
                 "data.voc_root": str(devkit), "data.train_split": "train", "features.scales": list(SCALES),
                 "features.batch_images": 2, "model.backbone": "zf5", "model.fc_dim": 32}
    overrides.update(sets)
    return build_config(overrides=overrides)


def fake_pretrain(cfg, seed: int = 0) -> Path:
    """A random-weight ZF-5 SppNet saved as the run's finished pretrain stage."""
    torch.manual_seed(seed)
    model = nets.SppNet(nets.build_backbone("zf5"), fc_dim=cfg.model.fc_dim, num_classes=3)
    run = Run(cfg.run_dir)
    path = run.stage_dir("pretrain") / "model.pt"
    nets.save_checkpoint(path, model, {"class_names": ["a", "b", "c"]})
    run.write_manifest("pretrain", None, config={"seed": seed}, inputs={}, outputs={"model": path},
                       metrics={CONV_LAYERS_PART: nets.conv_layers_sha256(path)})
    return path


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, devkit):
    """One uninterrupted extraction of the train split (with flips), shared by the read-side tests."""
    root = tmp_path_factory.mktemp("runs")
    cfg = make_config(root, devkit)
    checkpoint = fake_pretrain(cfg)
    result = stage.run(cfg, "train")
    return cfg, checkpoint, result


def direct_maps(checkpoint: Path, image: np.ndarray, flip: bool = False) -> list[torch.Tensor]:
    model, _ = nets.load_checkpoint(checkpoint, expect_backbone="zf5")
    backbone = model.backbone.eval()
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    with torch.inference_mode():
        return [backbone(nets.preprocess(image, s, backbone.spec)[None])[0] for s in SCALES]


def read_all(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as handle:
        for image_id in handle:
            for name, dataset in handle[image_id].items():
                out[f"{image_id}/{name}"] = dataset[()]
    return out


# -- round trip and schema ------------------------------------------------------------------------------------
def test_maps_round_trip_equal_a_direct_backbone_forward(extracted, devkit):
    cfg, checkpoint, result = extracted
    cache = features_for(Run(cfg.run_dir), "train")
    dataset = VocDataset(devkit)
    assert cache.image_ids == ["img0", "img1", "img2"] and cache.scales == SCALES and cache.has_flip
    for image_id in cache.image_ids:
        image = dataset.load_image(image_id)
        assert cache.image_hw(image_id) == image.shape[:2]
        for flip in (False, True):
            got = cache.maps(image_id, flip=flip)
            want = direct_maps(checkpoint, image, flip)
            for scale, g, w in zip(SCALES, got, want):
                assert g.dtype == torch.float32 and g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3 * float(w.abs().max()))
    # The flipped maps are the mirrored image through the network, not mirrored maps (those differ at borders).
    plain, mirrored = cache.maps("img0")[1], cache.maps("img0", flip=True)[1]
    assert not torch.allclose(plain.flip(-1), mirrored, atol=1e-3)


def test_file_and_image_attributes(extracted):
    cfg, checkpoint, result = extracted
    manifest = result.manifest
    path = manifest.output("features")
    assert path.name == "features.h5" and not partial_path(path).exists()
    with h5py.File(path, "r") as handle:
        attrs = handle.attrs
        assert attrs["schema"] == 1 and attrs["backbone"] == "zf5" and attrs["split"] == "train"
        assert attrs["checkpoint_sha256"] == sha256_file(checkpoint)
        assert list(attrs["scales"]) == list(SCALES) and bool(attrs["flip"]) and bool(attrs[COMPLETE])
        assert attrs["stride"] == 16 and attrs["spec_offset0"] == 21.0 and attrs["spec_offset"] == 6.5
        assert attrs["spec_channels"] == 256 and attrs["spec_pixel_mode"] == "bgr128"
        assert [str(i) for i in attrs["image_ids"]] == ["img0", "img1", "img2"]
        group = handle["img1"]
        assert tuple(group.attrs["image_hw"]) == SIZES["img1"] and bool(group.attrs[COMPLETE])
        assert list(group.attrs["scales"]) == list(SCALES) and group.attrs["stride"] == 16
        assert sorted(group) == sorted(map_name(s, f) for s in SCALES for f in (False, True))
        dataset = group[map_name(96)]
        assert dataset.dtype == np.float16 and dataset.chunks == dataset.shape and dataset.compression == "gzip"
        assert dataset.fletcher32 and dataset.shape[0] == 256
    metrics = manifest.metrics
    assert metrics["images"] == 3 and metrics["images_computed"] == 3 and metrics["images_resumed"] == 0
    assert metrics["bytes_per_image"] == pytest.approx(path.stat().st_size / 3, abs=1)
    assert metrics["peak_rss_mb"] > 0 and metrics["images_per_s"] > 0
    assert manifest.data["inputs"]["model"]["manifest"].startswith("00_pretrain")
    assert manifest.data["config"]["features"] == {"scales": list(SCALES), "flip": True, "compression": 4}


def test_rerun_is_skipped_and_other_scales_recompute(extracted, devkit):
    cfg, _, first = extracted
    again = stage.run(cfg, "train")
    assert again.skipped and again.manifest.fingerprint == first.manifest.fingerprint
    other = make_config(Path(cfg.runs_root), devkit, run=cfg.run + "-s1", **{"features.scales": [96]})
    fake_pretrain(other)
    result = stage.run(other, "train")
    assert not result.skipped and FeatureCache(result.manifest.output("features")).scales == (96,)


def test_maps_depend_on_the_conv_layers_alone(devkit, tmp_path):
    # A new fc_dim (or pyramid, or class list) rewrites the pretrain checkpoint but not its conv layers: the maps
    # stay up to date. New conv weights make them stale.
    cfg = make_config(tmp_path, devkit)
    fake_pretrain(cfg)
    first = stage.run(cfg, "test")
    record = first.manifest.data["inputs"]["model"]
    assert record["part"] == CONV_LAYERS_PART and record["manifest"].startswith("00_pretrain")
    assert record["fingerprint"] == nets.conv_layers_sha256(Run(cfg.run_dir).stage_dir("pretrain") / "model.pt")
    torch.manual_seed(0)
    wider = nets.SppNet(nets.build_backbone("zf5"), fc_dim=64, num_classes=2)  # same seed: same conv weights
    path = Run(cfg.run_dir).stage_dir("pretrain") / "model.pt"
    written = nets.save_checkpoint(path, wider, {"class_names": ["a", "b"]})
    assert written == nets.conv_layers_sha256(path) == record["fingerprint"]  # what it returns = what the file holds
    Run(cfg.run_dir).write_manifest("pretrain", None, config={"seed": 0, "fc_dim": 64}, inputs={},
                                    outputs={"model": path}, metrics={CONV_LAYERS_PART: written})
    assert stage.run(cfg, "test").skipped
    features_for(Run(cfg.run_dir), "test")  # and a reader finds them fresh
    fake_pretrain(cfg, seed=1)  # other conv weights
    again = stage.run(cfg, "test")
    assert not again.skipped and again.manifest.data["inputs"]["model"]["fingerprint"] != record["fingerprint"]


def test_test_split_has_no_flips_and_batching_does_not_change_maps(extracted, devkit, tmp_path):
    cfg, _, _ = extracted
    single = make_config(tmp_path, devkit, **{"features.batch_images": 1})
    fake_pretrain(single)  # same seed, same weights
    result = stage.run(single, "test")
    cache = features_for(Run(single.run_dir), "test")
    assert not cache.has_flip and cache.image_ids == ["img1", "img2"]
    with pytest.raises(SppError, match="no flipped maps"):
        cache.maps("img1", flip=True)
    batched = features_for(Run(cfg.run_dir), "train")
    for image_id in ("img1", "img2"):
        for a, b in zip(cache.maps(image_id), batched.maps(image_id)):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))
    assert result.manifest.data["config"]["features"]["flip"] is False


# -- pooled features ------------------------------------------------------------------------------------------
def random_boxes(rng, height, width, n=40):
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1] + 1, y[:, 1] + 1], axis=1)
    return np.minimum(boxes, [width, height, width, height])


def test_pooled_equals_pool_windows_on_the_maps(extracted, devkit):
    cfg, checkpoint, _ = extracted
    cache = features_for(Run(cfg.run_dir), "train")
    pyramid = (1, 2, 3, 6)
    rng = np.random.default_rng(3)
    height, width = cache.image_hw("img1")
    boxes = random_boxes(rng, height, width)
    maps = cache.maps("img1")
    best = cache.pooled("img1", boxes, pyramid)
    assert best.shape == (len(boxes), 256 * 50) and best.dtype == torch.float32
    assert torch.equal(best, spp.pool_windows(maps, (height, width), SCALES, boxes, cache.spec, pyramid))
    # The float16 cache against float32 maps straight from the backbone: same windows, same scales.
    image = VocDataset(devkit).load_image("img1")
    direct = spp.pool_windows(direct_maps(checkpoint, image), (height, width), SCALES, boxes, cache.spec, pyramid)
    torch.testing.assert_close(best, direct, rtol=2e-3, atol=2e-3 * float(direct.abs().max()))
    # 1-scale rows: only the chosen scale of the multi-scale cache.
    one = cache.pooled("img1", boxes, pyramid, scales_subset=(96,))
    assert torch.equal(one, spp.pool_windows([maps[1]], (height, width), (96,), boxes, cache.spec, pyramid))
    only_96 = cache.maps("img1", scales_subset=(96,))
    assert len(only_96) == 1 and torch.equal(only_96[0], maps[1])
    # A fixed index and a seeded random choice per window.
    fixed = cache.pooled("img1", boxes, pyramid, scale_choice=0)
    assert torch.equal(fixed, spp.pool_windows(maps, (height, width), SCALES, boxes, cache.spec, pyramid,
                                               scale_index=np.zeros(len(boxes), dtype=np.int64)))
    rand = cache.pooled("img1", boxes, pyramid, scale_choice="random", rng=np.random.default_rng(7))
    index = np.random.default_rng(7).integers(0, len(SCALES), size=len(boxes))
    assert 0 < index.sum() < len(boxes)  # both scales are used
    assert torch.equal(rand, spp.pool_windows(maps, (height, width), SCALES, boxes, cache.spec, pyramid,
                                              scale_index=index))
    # Indices chosen beforehand (a torchrun rank pools some of a draw's windows): each window as in the draw.
    some = np.arange(len(boxes)) % 3 == 1
    assert torch.equal(cache.pooled("img1", boxes[some], pyramid, scale_choice=index[some]), rand[some])
    with pytest.raises(ValueError, match="scale indices"):
        cache.pooled("img1", boxes, pyramid, scale_choice=index[some])
    # Flipped: the flipped boxes on the flipped image's maps.
    flipped = cache.pooled("img1", boxes, pyramid, flip=True)
    assert torch.equal(flipped, spp.pool_windows(cache.maps("img1", flip=True), (height, width), SCALES,
                                                 flip_boxes(boxes, width), cache.spec, pyramid))
    assert cache.pooled("img1", np.zeros((0, 4)), pyramid).shape == (0, 256 * 50)
    with pytest.raises(ValueError, match="rng"):
        cache.pooled("img1", boxes, pyramid, scale_choice="random")
    with pytest.raises(SppError, match="not in the feature cache"):
        cache.pooled("img1", boxes, pyramid, scales_subset=(688,))
    with pytest.raises(SppError, match="not in the feature cache"):
        cache.maps("nope")


def test_distinct_windows_pool_once_and_expand_to_the_same_features(extracted):
    from stages.core import fcfeatures

    cfg, _, _ = extracted
    cache = features_for(Run(cfg.run_dir), "train")
    pyramid = (1, 2, 3, 6)
    height, width = cache.image_hw("img1")
    boxes = random_boxes(np.random.default_rng(5), height, width)
    # Sub-pixel shifts land on the same conv5 cells (16 px each): these rows are repeats of the first 20.
    boxes = np.concatenate([boxes, np.minimum(boxes[:20] + 0.25, [width, height, width, height])])
    maps = fcfeatures.load_maps(cache, "img1")
    distinct = fcfeatures.distinct_windows(maps, boxes)
    assert len(distinct.rows) < len(boxes) - 15 and len(distinct.inverse) == len(boxes)
    scale_index, cells = fcfeatures.window_cells(maps, boxes)
    keys = np.column_stack([scale_index, cells])
    assert len(np.unique(keys[distinct.rows], axis=0)) == len(distinct.rows)  # no two picked rows share a key
    assert np.array_equal(keys[distinct.rows][distinct.inverse], keys)  # every window maps to its own key
    assert np.array_equal(distinct.scale_index, scale_index[distinct.rows])
    every = fcfeatures.pool_windows(maps, boxes, pyramid)
    once = fcfeatures.pool_windows(maps, boxes[distinct.rows], pyramid, scale_index=distinct.scale_index)
    assert torch.equal(once[torch.from_numpy(distinct.inverse)], every)
    nothing = fcfeatures.distinct_windows(maps, np.zeros((0, 4)))
    assert len(nothing.rows) == len(nothing.inverse) == 0


def test_cache_survives_pickling_for_worker_processes(extracted):
    import pickle

    cfg, _, _ = extracted
    cache = features_for(Run(cfg.run_dir), "train")
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.maps("img2")[0], cache.maps("img2")[0])


def test_a_forked_child_opens_its_own_handle_and_leaves_the_inherited_one_open(extracted):
    """A forked worker (finetune's loaders) reads through a handle of its own and never closes the parent's:
    closing it would run HDF5's close of the parent's file in the child."""
    import multiprocessing

    cfg, _, _ = extracted
    cache = features_for(Run(cfg.run_dir), "train")
    cache.maps("img2")  # opens the parent's handle
    expected = features_for(Run(cfg.run_dir), "train").maps("img0")[0]
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def child() -> None:
        open_files = lambda: len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))  # noqa: E731
        before = open_files()
        same = torch.equal(cache.maps("img0")[0], expected)  # not in the inherited memory cache: reopens
        send.send((before, open_files(), same))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    before, after, same = receive.recv()
    process.join()
    assert same and after == before + 1  # a new handle beside the inherited one, which stays open
    assert torch.equal(cache.maps("img0")[0], expected)  # and the parent's handle still works

# -- damaged files --------------------------------------------------------------------------------------------
def test_truncated_or_damaged_file_is_one_line_error_naming_the_stage(extracted, tmp_path):
    cfg, _, result = extracted
    source = result.manifest.output("features")
    folder = tmp_path / "02_features" / "train"
    folder.mkdir(parents=True)
    truncated = folder / "features.h5"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(SppError, match=r"features\.h5.*rerun `spp extract-features --run \S+ --runs-root \S+ "
                                       r"--split train`") as err:
        FeatureCache(truncated).maps("img0")
    assert "\n" not in str(err.value)
    # Flip bytes inside a stored map: the fletcher32 checksum turns silent garbage into an error.
    damaged = folder / "damaged.h5"
    data = bytearray(source.read_bytes())
    with h5py.File(source, "r") as handle:
        offset = handle["img2"][map_name(96)].id.get_chunk_info(0).byte_offset
    data[offset + 10: offset + 20] = bytes(10)
    damaged.write_bytes(bytes(data))
    with pytest.raises(SppError, match="cannot read map s96 of image 'img2'.*extract-features"):
        FeatureCache(damaged).maps("img2")


def test_missing_pretrain_names_the_command(devkit, tmp_path):
    cfg = make_config(tmp_path, devkit)
    with pytest.raises(StageInputMissing, match="spp pretrain"):
        stage.run(cfg, "train")


def test_corrupt_partial_file_is_moved_aside_and_extraction_restarts(extracted, devkit, tmp_path):
    cfg = make_config(tmp_path, devkit)
    fake_pretrain(cfg)
    folder = Run(cfg.run_dir).stage_dir("features", "test")
    folder.mkdir(parents=True)
    (folder / "features.partial.h5").write_bytes(b"not an HDF5 file at all")
    result = stage.run(cfg, "test")
    assert (folder / "features.partial.h5.corrupt").read_bytes() == b"not an HDF5 file at all"
    assert result.manifest.metrics["images_computed"] == 2


# -- resume after a kill ---------------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from stages import extract_features as stage
    from stages.core import features
    from stages.core.config import build_config

    written = []
    original_write_map = features.FeatureWriter._write_map
    original_write_image = features.FeatureWriter.write_image

    def write_map(self, group, name, array):
        original_write_map(self, group, name, array)
        if written:  # second image: stop half way through its maps and wait to be killed
            self.file.flush()
            print("HALFWAY", flush=True)
            time.sleep(600)

    def write_image(self, image_id, *args, **kwargs):
        original_write_image(self, image_id, *args, **kwargs)
        written.append(image_id)

    features.FeatureWriter._write_map = write_map
    features.FeatureWriter.write_image = write_image
    stage.run(build_config(overrides=__OVERRIDES__), "train")
""")


@pytest.mark.slow
def test_killed_extraction_resumes_without_recomputing_finished_images(extracted, devkit, tmp_path, caplog):
    cfg = make_config(tmp_path, devkit, **{"features.batch_images": 1})
    fake_pretrain(cfg)
    overrides = {k: v for k, v in {"runs_root": cfg.runs_root, "run": cfg.run, "device": "cpu",
                                   "data.dataset": "synth", "data.voc_root": cfg.data.voc_root,
                                   "data.train_split": "train", "features.scales": list(SCALES),
                                   "features.batch_images": 1, "model.backbone": "zf5",
                                   "model.fc_dim": cfg.model.fc_dim}.items()}
    script = KILL_SCRIPT.replace("__OVERRIDES__", repr(overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALFWAY", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)  # no cleanup, no close: as if the machine pulled the plug on the process
    finally:
        proc.kill()
        proc.wait()
    folder = Run(cfg.run_dir).stage_dir("features", "train")
    partial = folder / "features.partial.h5"
    assert partial.exists() and not (folder / "features.h5").exists()
    assert not Run(cfg.run_dir).manifest_path("features", "train").exists()

    with caplog.at_level(logging.INFO, logger="stages"):
        result = stage.run(cfg, "train")
    assert "resuming, 1 image(s) already complete, 1 incomplete image(s) dropped" in caplog.text
    assert result.extra["computed_ids"] == ["img1", "img2"]  # img0 was finished before the kill: kept
    assert result.manifest.metrics["images_resumed"] == 1 and result.manifest.metrics["images"] == 3
    resumed = read_all(result.manifest.output("features"))
    reference = read_all(extracted[2].manifest.output("features"))
    assert resumed.keys() == reference.keys()
    for key in reference:  # same weights (same seed): the same float16 maps as an uninterrupted run
        np.testing.assert_allclose(resumed[key].astype(np.float32), reference[key].astype(np.float32),
                                   rtol=2e-3, atol=2e-3 * float(np.abs(reference[key]).max()))


def test_writer_drops_incomplete_groups_and_restarts_on_other_settings(tmp_path):
    spec = nets.build_backbone("zf5").spec
    header = {"schema": 1, "backbone": "zf5", "checkpoint_sha256": "c", "dataset_fingerprint": "d", "split": "s",
              "scales": [8], "flip": False, "compression": 1, "rank": 0, "world_size": 1}
    final = tmp_path / "features.h5"
    writer = FeatureWriter(final, header, spec, 1)
    assert writer.open() == set()
    writer.write_image("a", (10, 10), 0, {"s8": np.ones((2, 1, 1), np.float16)})
    group = writer.file.create_group("b")  # a group whose maps were never finished
    group.create_dataset("s8", data=np.ones((2, 1, 1), np.float16))
    writer.close()
    again = FeatureWriter(final, header, spec, 1)
    assert again.open() == {"a"} and "b" not in again.file
    again.close()
    again = FeatureWriter(final, header, spec, 1)
    again.open()
    again.finish(["a"], [0], [], {})
    assert final.exists() and not partial_path(final).exists()
    # A finished file whose manifest was never written (killed in between) is reused, not recomputed.
    reused = FeatureWriter(final, header, spec, 1)
    assert reused.open() == {"a"} and not final.exists()
    reused.close()
    other = FeatureWriter(final, dict(header, scales=[8, 16]), spec, 1)
    assert other.open() == set() and "other settings" in other.notes[0]
    other.close()


def test_bad_image_stops_the_stage_or_is_skipped_with_skip_bad(devkit, tmp_path):
    import shutil

    broken = tmp_path / "devkit"
    shutil.copytree(devkit, broken)
    (broken / "VOC2007" / "JPEGImages" / "img1.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = make_config(tmp_path, broken)
    fake_pretrain(cfg)
    with pytest.raises(SppError, match=r"img1\.jpg"):
        stage.run(cfg, "test")
    assert (Run(cfg.run_dir).stage_dir("features", "test") / "features.partial.h5").exists()  # kept for a rerun
    skipping = make_config(tmp_path, broken, **{"data.skip_bad": True})
    with pytest.warns(UserWarning, match="img1"):
        result = stage.run(skipping, "test")
    assert result.manifest.metrics["images_skipped"] == 1 and result.manifest.metrics["images"] == 1
    cache = features_for(Run(skipping.run_dir), "test")
    assert cache.image_ids == ["img2"] and "img1" not in cache


def test_deleted_feature_file_is_rebuilt_not_reported_up_to_date(devkit, tmp_path):
    cfg = make_config(tmp_path, devkit, **{"features.scales": [64]})
    fake_pretrain(cfg)
    first = stage.run(cfg, "test")
    first.manifest.output("features").unlink()
    again = stage.run(cfg, "test")
    assert not again.skipped and again.manifest.output("features").exists()


# -- torchrun sharding ----------------------------------------------------------------------------------------
def test_two_ranks_write_shards_and_rank0_writes_one_manifest(extracted, devkit, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, devkit)
    fake_pretrain(cfg)
    run = Run(cfg.run_dir)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank1 = stage.run(cfg, "train")
    assert rank1.manifest is None and "rank 0 writes the manifest" in rank1.summary
    folder = run.stage_dir("features", "train")
    assert (folder / "features.rank1.h5").exists() and not run.manifest_path("features", "train").exists()
    monkeypatch.setenv("RANK", "0")
    rank0 = stage.run(cfg, "train")
    outputs = rank0.manifest.data["outputs"]
    assert outputs == {"features.rank0": "features.rank0.h5", "features.rank1": "features.rank1.h5"}
    assert rank0.extra["computed_ids"] == ["img0", "img2"]  # images 0::2 ; rank 1 did 1::2
    metrics = rank0.manifest.metrics
    assert metrics["images"] == 3 and metrics["shards"] == 2 and metrics["images_computed"] == 3
    cache = features_for(run, "train")
    assert cache.image_ids == ["img0", "img1", "img2"] and len(cache.paths) == 2
    single = features_for(Run(extracted[0].run_dir), "train")
    for image_id in cache.image_ids:
        for flip in (False, True):
            for a, b in zip(cache.maps(image_id, flip), single.maps(image_id, flip)):
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SppError, match="invalid torchrun rank"):
        stage.run(cfg, "train")


def test_rank0_waits_for_a_stale_shard_to_be_replaced(devkit, tmp_path, monkeypatch):
    """Rank 0 must not list a shard left by another configuration; it waits until rank 1 rewrites it."""
    cfg = make_config(tmp_path, devkit)
    fake_pretrain(cfg)
    folder = Run(cfg.run_dir).stage_dir("features", "train")
    folder.mkdir(parents=True)
    stale = FeatureWriter(folder / "features.rank1.h5", {"schema": 1, "backbone": "zf5", "rank": 1,
                                                         "world_size": 2, "scales": [8], "flip": True,
                                                         "checkpoint_sha256": "old", "split": "train",
                                                         "dataset_fingerprint": "x", "compression": 4},
                          nets.build_backbone("zf5").spec, 4)
    stale.open()
    stale.finish([], [], [], {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    calls = []

    def fake_wait(paths, ready, **kwargs):
        calls.append([ready(p) for p in paths])
        raise SppError("would wait")

    monkeypatch.setattr(stage, "wait_for_files", fake_wait)
    with pytest.raises(SppError, match="would wait"):
        stage.run(cfg, "train")
    assert calls == [[True, False]]


def test_torchvision_trunk_without_pretrain_records_the_weights_sha(devkit, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "mnv2_features.pt"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), weights)
    cfg = make_config(tmp_path, devkit, **{"model.backbone": "mobilenet_v2", "model.weights": str(weights),
                                           "features.scales": [64]})
    result = stage.run(cfg, "test")
    record = result.manifest.data["inputs"]["model"]
    assert record == {"weights": str(weights), "sha256": sha256_file(weights)}
    cache = features_for(Run(cfg.run_dir), "test")
    assert cache.backbone == "mobilenet_v2" and cache.spec.pixel_mode == "imagenet" and cache.spec.channels == 96
    assert cache.checkpoint_sha256 == sha256_file(weights)
    backbone = nets.build_backbone("mobilenet_v2", str(weights)).eval()
    image = VocDataset(devkit).load_image("img2")
    with torch.inference_mode():
        want = backbone(nets.preprocess(image, 64, backbone.spec)[None])[0]
    torch.testing.assert_close(cache.maps("img2")[0], want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
