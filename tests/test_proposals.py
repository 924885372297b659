"""Selective-search proposals: box convention, filters, recall, the stage's HDF5 cache, resume, precomputed input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages import proposals
from stages.core.artifacts import Run
from stages.core.config import ProposalConfig, build_config
from stages.core.errors import InputError, StageInputMissing
from stages.core.proposals import (best_overlaps, filter_boxes, image_seed, load_proposals, raw_selective_search,
                                   rects_to_boxes, selective_search)
from stages.core.voc import VocDataset
from conftest import write_devkit

REPO = Path(__file__).resolve().parents[1]


def scene(seed: int, height: int = 120, width: int = 160, n_objects: int = 2):
    """A noisy gradient background with solid rectangles; returns (RGB image, [(class, VOC box, difficult)])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 80 / width + 40, yy * 80 / height + 40, np.full_like(xx, 90.0)], axis=2)
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    objects = []
    for k in range(n_objects):
        w, h = int(rng.integers(width // 4, width // 2)), int(rng.integers(height // 4, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        image[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
        objects.append(("red" if k % 2 == 0 else "green", (x0 + 1, y0 + 1, x0 + w, y0 + h), False))
    # Later rectangles may cover earlier ones: keep only the last one's box exact (it is fully visible).
    return image, objects


def make_devkit(root: Path, n: int, size=(120, 160), split="val") -> Path:
    images = {f"im{k:03d}": scene(k, *size) for k in range(n)}
    return write_devkit(root, images, {split: list(images)}, classes=("red", "green"))


def make_cfg(tmp_path: Path, devkit: Path, run="r", **sets):
    overrides = {"runs_root": str(tmp_path / "runs"), "run": run, "data.dataset": "voc2007",
                 "data.voc_root": str(devkit), "proposals.workers": 1}
    overrides.update(sets)
    return build_config(None, overrides)


def stored(cfg, split="val") -> dict[str, np.ndarray]:
    with load_proposals(Run(cfg.run_dir), split) as store:
        return {image_id: store.boxes(image_id) for image_id in store.image_ids}


# -- pure functions -------------------------------------------------------------------------------------------------
def test_opencv_rects_become_half_open_boxes():
    # (x, y, w, h) = (3, 4, 10, 5) covers pixel columns 3..12 and rows 4..8 -> [3, 4, 13, 9).
    np.testing.assert_array_equal(rects_to_boxes(np.array([[3, 4, 10, 5], [0, 0, 1, 1]])),
                                  [[3, 4, 13, 9], [0, 0, 1, 1]])
    assert rects_to_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_filter_boxes_min_side_clip_dedupe_cap_keep_order():
    boxes = np.array([
        [0, 0, 19, 50],     # width 19 < 20: dropped (R-CNN drops by min side)
        [0, 0, 50, 19],     # height 19 < 20: dropped
        [5, 5, 25, 25],     # 20 x 20: kept
        [-10, 0, 30, 40],   # clipped to [0, 0, 30, 40]
        [5, 5, 25, 25],     # duplicate of row 2: dropped, first kept
        [90, 90, 130, 95],  # clipped to [90, 90, 100, 95] -> height 5: dropped
        [40, 40, 100, 100],
        [10, 10, 60, 60],
    ], dtype=np.float64)
    out = filter_boxes(boxes, width=100, height=100, min_side=20, max_boxes=0)
    np.testing.assert_array_equal(out, [[5, 5, 25, 25], [0, 0, 30, 40], [40, 40, 100, 100], [10, 10, 60, 60]])
    capped = filter_boxes(boxes, width=100, height=100, min_side=20, max_boxes=2)
    np.testing.assert_array_equal(capped, out[:2])
    # min_side 0 still drops empty boxes.
    assert len(filter_boxes(np.array([[3, 3, 3, 9]]), 10, 10, 0, 0)) == 0
    # SPEC's literal "narrower": only the width counts, so the 50 x 19 box stays (the clipped 10 x 5 does not).
    by_width = filter_boxes(boxes, width=100, height=100, min_side=20, max_boxes=0,
                                      min_side_applies_to="width")
    np.testing.assert_array_equal(by_width, [[0, 0, 50, 19], [5, 5, 25, 25], [0, 0, 30, 40], [40, 40, 100, 100],
                                             [10, 10, 60, 60]])


def test_best_overlaps_and_recall_hand_computed():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 10]], dtype=np.float64)
    difficult = np.array([False, True, False])
    props = np.array([[0, 0, 10, 5],      # IoU 50/100 = 0.5 with GT 0 (counts at 0.5: ">=")
                      [20, 20, 40, 36]])  # IoU 320/400 = 0.8 with GT 1 (difficult)
    best = best_overlaps(gt, props)
    np.testing.assert_allclose(best, [0.5, 0.8, 0.0])
    m = proposals.recall_metrics(best, difficult)
    assert (m["gt_boxes"], m["gt_boxes_all"]) == (2, 3)
    assert m["recall@0.5"] == 0.5 and m["recall@0.7"] == 0.0  # non-difficult: GT 0 and GT 2
    assert m["recall@0.5_all"] == pytest.approx(2 / 3) and m["recall@0.7_all"] == pytest.approx(1 / 3)
    assert m["mabo"] == pytest.approx(0.25)
    assert best_overlaps(gt, np.zeros((0, 4))).tolist() == [0, 0, 0]


def test_selective_search_finds_drawn_rectangle_inside_image():
    image, objects = scene(3, 120, 160)
    boxes = selective_search(image, ProposalConfig(max_boxes=2000), seed=0)
    assert boxes.dtype == np.float64 and boxes.shape[1] == 4 and 0 < len(boxes) <= 2000
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 20).all()  # SPEC's "narrower than 20 px" dropped
    assert ((boxes[:, 3] - boxes[:, 1]) < 20).any()  # shorter ones are kept by default...
    both = selective_search(image, ProposalConfig(max_boxes=2000, min_side_applies_to="both"), seed=0)
    assert (np.minimum(both[:, 2] - both[:, 0], both[:, 3] - both[:, 1]) >= 20).all()  # ...and dropped by "both"
    short = (boxes[:, 3] - boxes[:, 1]) < 20
    np.testing.assert_array_equal(both, boxes[~short])  # the same boxes in the same order otherwise
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    np.testing.assert_array_equal(boxes, np.round(boxes))  # pixel edges when not downscaled
    xmin, ymin, xmax, ymax = objects[-1][1]  # the top rectangle: a perfect segment
    assert best_overlaps(np.array([[xmin - 1, ymin - 1, xmax, ymax]]), boxes)[0] == 1.0
    # The full-image box is always a region (the top of every hierarchy).
    assert any((b == [0, 0, 160, 120]).all() for b in boxes)


def test_ranking_puts_the_top_of_the_hierarchies_first():
    # The SS paper ranks large (top-of-hierarchy) regions first; OpenCV's raw order is small-first.
    image, _ = scene(9, 120, 160, n_objects=3)
    boxes = raw_selective_search(image, (50, 100), 0.8, seed=0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    half = len(areas) // 2
    assert len(areas) > 20 and areas[:half].mean() > 1.2 * areas[half:].mean()  # raw OpenCV order: < 0.7x


def test_selective_search_is_reproducible_per_seed():
    image, _ = scene(5, 120, 160, n_objects=3)
    params = ProposalConfig()
    a = selective_search(image, params, seed=11)
    selective_search(image, params, seed=99)  # any C rand() state in between
    b = selective_search(image, params, seed=11)
    np.testing.assert_array_equal(a, b)
    c = selective_search(image, params, seed=12)  # another seed only reorders the same regions
    assert sorted(map(tuple, a)) == sorted(map(tuple, c))


def test_downscaled_search_maps_boxes_back():
    image, objects = scene(7, 240, 320)
    boxes = selective_search(image, ProposalConfig(max_image_side=160), seed=0)
    assert len(boxes) and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all() and (boxes >= 0).all()
    assert any((b == [0, 0, 320, 240]).all() for b in boxes)
    xmin, ymin, xmax, ymax = objects[-1][1]
    assert best_overlaps(np.array([[xmin - 1, ymin - 1, xmax, ymax]]), boxes)[0] > 0.9


# -- the stage ------------------------------------------------------------------------------------------------------
def test_stage_writes_h5_then_manifest_and_skips_when_up_to_date(tmp_path, monkeypatch):
    devkit = make_devkit(tmp_path / "devkit", 3)
    cfg = make_cfg(tmp_path, devkit)
    folder = Run(cfg.run_dir).stage_dir("proposals", "val")
    real_write = Run.write_manifest
    seen = {}

    def checking_write(self, *args, **kwargs):  # the manifest comes last: everything else is already final
        seen["h5"] = (folder / "proposals.h5").exists()
        seen["partial"] = (folder / "partial").exists()
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Run, "write_manifest", checking_write)
    result = proposals.run(cfg, "val")
    assert seen == {"h5": True, "partial": False} and not result.skipped
    metrics = result.manifest.metrics
    assert metrics["images"] == 3 and metrics["images_computed"] == 3 and metrics["workers"] == 1
    assert metrics["recall@0.5"] > 0.5 and "recall@0.7_all" in metrics and metrics["images_per_s"] > 0
    assert "recall@0.5" in result.summary

    # The stored boxes are exactly selective_search() with the per-image seed, in split order.
    dataset = VocDataset(devkit)
    got = stored(cfg)
    assert list(got) == dataset.image_ids("val")
    for image_id, boxes in got.items():
        want = selective_search(dataset.load_image(image_id), cfg.proposals,
                                          image_seed(cfg.seed, image_id))
        np.testing.assert_array_equal(boxes, want)
    with h5py.File(folder / "proposals.h5", "r") as handle:
        assert handle.attrs["schema"] == 1 and handle.attrs["split"] == "val"
        assert json.loads(handle.attrs["params"])["ks"] == [50, 100]
        assert handle["boxes/im000"].dtype == np.float32

    again = proposals.run(cfg, "val")
    assert again.skipped and again.manifest.fingerprint == result.manifest.fingerprint
    # More workers do not change the output, so the stage stays up to date.
    assert proposals.run(make_cfg(tmp_path, devkit, **{"proposals.workers": 2}), "val").skipped


def test_existing_file_is_reused_and_changed_params_recompute(tmp_path):
    devkit = make_devkit(tmp_path / "devkit", 3)
    cfg = make_cfg(tmp_path, devkit)
    proposals.run(cfg, "val")
    Run(cfg.run_dir).invalidate("proposals", "val")  # e.g. a crash after the file was written
    result = proposals.run(cfg, "val")
    assert result.manifest.metrics["images_reused"] == 3 and result.manifest.metrics["images_computed"] == 0
    changed = make_cfg(tmp_path, devkit, **{"proposals.min_side": 30})
    result = proposals.run(changed, "val")
    assert result.manifest.metrics["images_computed"] == 3
    boxes = np.concatenate(list(stored(changed).values()))
    assert ((boxes[:, 2] - boxes[:, 0]) >= 30).all()
    both = make_cfg(tmp_path, devkit, **{"proposals.min_side": 30, "proposals.min_side_applies_to": "both"})
    assert proposals.run(both, "val").manifest.metrics["images_computed"] == 3
    boxes = np.concatenate(list(stored(both).values()))
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 30).all()


def test_worker_pool_gives_the_single_process_result(tmp_path):
    devkit = make_devkit(tmp_path / "devkit", 4)
    one = make_cfg(tmp_path, devkit, run="one")
    two = make_cfg(tmp_path, devkit, run="two", **{"proposals.workers": 2})
    assert proposals.run(two, "val").manifest.metrics["workers"] == 2
    proposals.run(one, "val")
    a, b = stored(one), stored(two)
    assert list(a) == list(b)
    for image_id in a:
        np.testing.assert_array_equal(a[image_id], b[image_id])


def test_missing_stage_names_the_command(tmp_path):
    with pytest.raises(StageInputMissing, match=rf"run `spp proposals --run nowhere --runs-root {tmp_path} --split val` first"):
        load_proposals(Run(tmp_path / "nowhere"), "val")


def test_bad_image_is_one_line_error_or_skipped(tmp_path):
    devkit = make_devkit(tmp_path / "devkit", 3)
    bad = devkit / "VOC2007" / "JPEGImages" / "im001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = make_cfg(tmp_path, devkit)
    with pytest.raises(InputError, match=r"im001\.jpg") as err:
        proposals.run(cfg, "val")
    assert "\n" not in str(err.value)
    assert not Run(cfg.run_dir).manifest_path("proposals", "val").exists()

    skipping = make_cfg(tmp_path, devkit, **{"data.skip_bad": True})
    with pytest.warns(UserWarning, match="im001"):
        result = proposals.run(skipping, "val")
    assert result.manifest.metrics["images_skipped"] == 1
    assert list(stored(skipping)) == ["im000", "im002"]


def test_image_without_proposals_is_kept_empty(tmp_path):
    tiny = np.full((15, 18, 3), 120, np.uint8)  # smaller than min_side: no box survives
    images = {"big": scene(1), "tiny": (tiny, [("red", (2, 2, 12, 12), False)])}
    devkit = write_devkit(tmp_path / "devkit", images, {"val": ["big", "tiny"]}, classes=("red", "green"))
    cfg = make_cfg(tmp_path, devkit)
    with pytest.warns(UserWarning, match="no proposals.*tiny"):
        result = proposals.run(cfg, "val")
    assert result.manifest.metrics["images_without_proposals"] == 1
    with load_proposals(Run(cfg.run_dir), "val") as store:
        assert store.boxes("tiny").shape == (0, 4) and store.boxes("big").shape[0] > 0
        assert store.image_size("tiny") == (15, 18)
        with pytest.raises(InputError, match="no proposals for image 'nope'"):
            store.boxes("nope")


# -- precomputed boxes ------------------------------------------------------------------------------------------------
def test_boxes_file_npz_h5_mat_and_missing_image(tmp_path):
    devkit = make_devkit(tmp_path / "devkit", 2)
    ids = ["im000", "im001"]
    # VOC 1-based inclusive: [1, 1, 30, 30] is [0, 0, 30, 30); [5, 5, 10, 40] is 6 px wide -> dropped;
    # [100, 50, 999, 999] is clipped to the 160 x 120 image.
    voc = {"im000": np.array([[1, 1, 30, 30], [5, 5, 10, 40], [100, 50, 999, 999]], np.float64),
           "im001": np.zeros((0, 4))}
    np.savez(tmp_path / "boxes.npz", **voc)
    cfg = make_cfg(tmp_path, devkit, run="npz")
    with pytest.warns(UserWarning, match="no proposals.*im001"):  # im001 has none: kept empty
        result = proposals.run(cfg, "val", boxes_file=tmp_path / "boxes.npz")
    got = stored(cfg)
    np.testing.assert_array_equal(got["im000"], [[0, 0, 30, 30], [99, 49, 160, 120]])
    assert got["im001"].shape == (0, 4)
    assert result.manifest.metrics["input_boxes"] == 3

    # Our own HDF5 layout round-trips unchanged.
    h5_in = Run(cfg.run_dir).stage_dir("proposals", "val") / "proposals.h5"
    cfg_h5 = make_cfg(tmp_path, devkit, run="h5")
    with pytest.warns(UserWarning, match="no proposals"):
        proposals.run(cfg_h5, "val", boxes_file=h5_in)
    for image_id in ids:
        np.testing.assert_array_equal(stored(cfg_h5)[image_id], got[image_id])

    # The R-CNN .mat layout: boxes [y1 x1 y2 x2], 1-based inclusive.
    from scipy.io import savemat
    cells = np.empty(2, dtype=object)
    cells[0], cells[1] = np.array([[1.0, 1, 30, 30], [50, 100, 999, 999]]), np.zeros((0, 4))
    names = np.empty(2, dtype=object)
    names[0], names[1] = "im000", "im001"
    savemat(tmp_path / "boxes.mat", {"images": names, "boxes": cells})
    cfg_mat = make_cfg(tmp_path, devkit, run="mat")
    with pytest.warns(UserWarning, match="no proposals"):
        proposals.run(cfg_mat, "val", boxes_file=tmp_path / "boxes.mat")
    np.testing.assert_array_equal(stored(cfg_mat)["im000"], got["im000"])

    np.savez(tmp_path / "partial.npz", im000=voc["im000"])
    with pytest.raises(InputError, match=r"partial\.npz.*no boxes for image 'im001'"):
        proposals.run(make_cfg(tmp_path, devkit, run="bad"), "val", boxes_file=tmp_path / "partial.npz")
    np.savez(tmp_path / "shape.npz", im000=np.zeros((3, 5)), im001=np.zeros((0, 4)))
    with pytest.raises(InputError, match=r"shape\.npz.*im000.*shape \(3, 5\)"):
        proposals.run(make_cfg(tmp_path, devkit, run="bad"), "val", boxes_file=tmp_path / "shape.npz")


# -- resume after a killed process -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_kill_computes_each_image_once_and_matches_uninterrupted(tmp_path, monkeypatch):
    n = 24
    devkit = make_devkit(tmp_path / "devkit", n, size=(180, 240))
    cfg = make_cfg(tmp_path, devkit, run="killed")
    folder = Run(cfg.run_dir).stage_dir("proposals", "val")
    # The child stops itself before its fourth image (the first three written) and waits to be killed, so a
    # slow CI machine cannot let it finish first.
    script = textwrap.dedent(f"""
        import time
        from stages import proposals
        from stages.core.config import build_config
        from stages.proposals import worker
        real, started = worker._propose_one, []

        def propose(image_id):
            if len(started) == 3:
                print("STOPPED", flush=True)
                time.sleep(600)
            started.append(image_id)
            return real(image_id)

        worker._propose_one = propose
        cfg = build_config(None, {json.dumps({"runs_root": cfg.runs_root, "run": cfg.run,
                                              "data.dataset": "voc2007", "data.voc_root": str(devkit),
                                              "proposals.workers": 1})})
        proposals.run(cfg, "val")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "STOPPED", "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group we started
        proc.wait()
    finished = {p.stem for p in (folder / "partial").glob("*.npy")}
    assert 3 <= len(finished) < n, "kill the run mid-way"
    assert not (folder / "proposals.h5").exists() and not (folder / "MANIFEST.json").exists()

    computed = []
    real = proposals._propose_one

    def counting(image_id):
        computed.append(image_id)
        return real(image_id)

    monkeypatch.setattr(proposals.worker, "_propose_one", counting)
    result = proposals.run(cfg, "val")
    assert sorted(computed) == sorted(set(VocDataset(devkit).image_ids("val")) - finished)  # each once, none redone
    assert result.manifest.metrics["images_reused"] == len(finished)
    assert not (folder / "partial").exists()

    monkeypatch.setattr(proposals.worker, "_propose_one", real)
    clean = make_cfg(tmp_path, devkit, run="clean")
    proposals.run(clean, "val")
    resumed, uninterrupted = stored(cfg), stored(clean)
    assert list(resumed) == list(uninterrupted)
    for image_id in resumed:
        np.testing.assert_array_equal(resumed[image_id], uninterrupted[image_id])
