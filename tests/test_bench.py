"""R-CNN-mode crops and features, the FLOP counter, the fast SPP path and `spp bench` end to end (tiny sizes)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stages import bench
from stages.core import nets, rcnn, spp
from stages.core.config import build_config
from stages.core.errors import SppError

ZF5 = nets.BackboneSpec(name="zf5", stride=16, channels=256, offset0=21.0, offset=6.5, pixel_mode="bgr128")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _bilinear_reference(pixels: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Loop reference of the warp: output pixel (v, u) samples x = bx1 + (u + 0.5) bw/S - 0.5 (same for y) with
    bilinear weights, pixels outside the image being 0."""
    channels, height, width = pixels.shape
    x1, y1, x2, y2 = box
    out = np.zeros((channels, size, size))

    def pixel(yy: int, xx: int) -> np.ndarray:
        return pixels[:, yy, xx] if 0 <= yy < height and 0 <= xx < width else np.zeros(channels)

    for v in range(size):
        y = y1 + (v + 0.5) * (y2 - y1) / size - 0.5
        for u in range(size):
            x = x1 + (u + 0.5) * (x2 - x1) / size - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            ax, ay = x - x0, y - y0
            out[:, v, u] = ((1 - ay) * ((1 - ax) * pixel(y0, x0) + ax * pixel(y0, x0 + 1))
                            + ay * ((1 - ax) * pixel(y0 + 1, x0) + ax * pixel(y0 + 1, x0 + 1)))
    return out


# ------------------------------------------------------------------------------------------------ R-CNN crops


def test_context_boxes_hand_values():
    # A 192-px box warped to 224 with 16 px context: grown by 224/192 about its centre (106, 116) -> 224 px.
    grown = rcnn.context_boxes(np.array([[10.0, 20.0, 202.0, 212.0]]), 224, 16)
    np.testing.assert_allclose(grown, [[-6.0, 4.0, 218.0, 228.0]])
    np.testing.assert_allclose(rcnn.context_boxes(np.array([[1.0, 2.0, 30.0, 40.0]]), 224, 0), [[1, 2, 30, 40]])
    with pytest.raises(ValueError):
        rcnn.context_boxes(np.zeros((1, 4)), 32, 16)


def test_whole_image_window_without_context_is_the_preprocess_resize():
    image = _image(100, 100)
    pixels = nets.preprocess(image, 100, ZF5)  # original size: pixel conversion only
    crop = rcnn.warp_windows(pixels, np.array([[0.0, 0.0, 100.0, 100.0]]), input_size=48, context=0)[0]
    resized = nets.preprocess(image, 48, ZF5)  # bilinear, no antialiasing, to 48 x 48
    assert crop.shape == resized.shape == (3, 48, 48)
    torch.testing.assert_close(crop, resized, atol=1e-2, rtol=0)  # float32 grid: < 0.01 grey level
    # A non-square image is warped anisotropically: the same as resizing it to S x S.
    wide = _image(60, 90, seed=1)
    pixels = nets.preprocess(wide, 60, ZF5)
    crop = rcnn.warp_windows(pixels, np.array([[0.0, 0.0, 90.0, 60.0]]), input_size=32, context=0)[0]
    expected = F.interpolate(pixels[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(crop, expected, atol=1e-2, rtol=0)


def test_unit_scale_window_is_an_exact_crop_with_zero_padding_outside():
    pixels = torch.randn(3, 300, 400)
    # 192 px box + 16 px context on each side = 224 px: the warp copies pixels one to one.
    crop = rcnn.warp_windows(pixels, np.array([[50.0, 40.0, 242.0, 232.0]]), 224, 16)[0]
    torch.testing.assert_close(crop, pixels[:, 24:248, 34:258], atol=5e-4, rtol=0)
    # Sticking out at the top left: the outside is the (zero) mean pixel, the inside the image.
    crop = rcnn.warp_windows(pixels, np.array([[-10.0, -20.0, 182.0, 172.0]]), 224, 16)[0]
    torch.testing.assert_close(crop[:, 36:, 26:], pixels[:, :188, :198], atol=5e-4, rtol=0)
    assert crop[:, :36].abs().max() < 1e-3 and crop[:, :, :26].abs().max() < 1e-3


def test_batched_warp_matches_loop_reference():
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.normal(size=(3, 23, 31))).float()
    boxes = np.array([[0, 0, 31, 23], [3.5, 2.0, 12.25, 20.0], [20, 5, 40, 30], [10, 10, 11, 12]], dtype=np.float64)
    crops = rcnn.warp_windows(pixels, boxes, input_size=9, context=2)
    grown = rcnn.context_boxes(boxes, 9, 2)
    for k in range(len(boxes)):
        expected = _bilinear_reference(pixels.double().numpy(), grown[k], 9)
        np.testing.assert_allclose(crops[k].numpy(), expected, atol=1e-4)
    assert rcnn.warp_windows(pixels, np.zeros((0, 4)), 9, 2).shape == (0, 3, 9, 9)


def _tiny_net(fc_dim: int = 32, seed: int = 0) -> nets.SppNet:
    torch.manual_seed(seed)
    return nets.build_sppnet("zf5", fc_dim=fc_dim, num_classes=5).eval()


def test_rcnn_features_equal_per_window_pipeline_and_do_not_depend_on_batch():
    net = _tiny_net()
    image = _image(70, 90)
    boxes = np.array([[0, 0, 90, 70], [5, 8, 40, 50], [30, 20, 88, 69], [-5, -5, 20, 20], [40, 10, 60, 30]], float)
    pyramid = (1, 2, 3, 6)
    with torch.inference_mode():
        batched = rcnn.rcnn_window_features(net.backbone, net.head, image, boxes, ZF5, pyramid, input_size=64,
                                            batch=2, layer="fc7")
        single = rcnn.rcnn_window_features(net.backbone, net.head, image, boxes, ZF5, pyramid, input_size=64,
                                           batch=5, layer="fc7")
        pixels = nets.preprocess(image, 70, ZF5)
        manual = []
        for box in boxes:
            crop = rcnn.warp_windows(pixels, box[None], 64, 16)
            pooled = spp.spp_pool_full(net.backbone(crop), pyramid)
            manual.append(net.head.features(pooled, "fc7"))
        pool5 = rcnn.rcnn_window_features(net.backbone, net.head, image, boxes, ZF5, pyramid, input_size=64,
                                          layer="pool5")
    assert batched.shape == (5, 32) and pool5.shape == (5, 256 * 50)
    torch.testing.assert_close(batched, torch.cat(manual), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert batched.abs().sum() > 0
    with pytest.raises(ValueError):
        rcnn.rcnn_window_features(net.backbone, net.head, image, boxes, ZF5, pyramid, layer="fc8")


# ------------------------------------------------------------------------------------------------ FLOP counter


def test_flop_counter_hand_values_conv_and_linear():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    grouped = nn.Conv2d(4, 8, kernel_size=(3, 5), stride=2, groups=2)
    linear = nn.Linear(20, 7)
    with bench.FlopCounter({"conv": nn.ModuleList([conv, grouped]), "fc": linear}) as counter:
        conv(torch.zeros(2, 3, 10, 10))  # 2 images x 8 x 10 x 10 outputs x 27 MACs x 2
        grouped(torch.zeros(1, 4, 11, 13))  # 8 x 5 x 5 outputs x (4/2 x 3 x 5) MACs x 2
        linear(torch.zeros(5, 20))  # 5 x 7 outputs x 20 MACs x 2
    assert counter.by_layer["conv.0"] == 2 * 2 * 8 * 10 * 10 * 27 == 86400
    assert counter.by_layer["conv.1"] == 2 * 8 * 5 * 5 * 2 * 15 == 12000
    assert counter.flops["conv"] == 86400 + 12000
    assert counter.flops["fc"] == 2 * 5 * 7 * 20 == 1400
    linear(torch.zeros(5, 20))  # hooks are gone after the with block
    assert counter.flops["fc"] == 1400


def test_flop_counter_zf5_at_224_matches_spec_map_sizes_and_torch_counter():
    from torch.utils.flop_counter import FlopCounterMode

    backbone = nets.build_backbone("zf5").eval()
    # SPEC §1 map sizes at 224: conv1 110, conv2 26, conv3-5 13.
    expected = 2 * (110 * 110 * 96 * 3 * 49 + 26 * 26 * 256 * 96 * 25 + 13 * 13 * 384 * 256 * 9
                    + 13 * 13 * 384 * 384 * 9 + 13 * 13 * 256 * 384 * 9)
    with torch.inference_mode(), bench.FlopCounter(backbone) as counter, FlopCounterMode(display=False) as reference:
        backbone(torch.zeros(1, 3, 224, 224))
    assert counter.flops["total"] == expected
    assert reference.get_total_flops() == expected


# ------------------------------------------------------------------------------------------------ the SPP path


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_spp_path_equals_pool_windows_reference(memory_format):
    net = _tiny_net()
    image = _image(60, 80, seed=2)
    scales = (48, 64, 96)
    rng = np.random.default_rng(0)
    boxes = bench.random_boxes(rng, (60, 80), 40, min_side=4)
    boxes = np.concatenate([boxes, boxes[:5], [[0, 0, 80, 60], [0, 0, 80, 60]]])  # duplicates pool once
    with torch.inference_mode():
        timer = bench.PhaseTimer(torch.device("cpu"))
        if memory_format == torch.channels_last:
            net.backbone.to(memory_format=torch.channels_last)
        fast, info = bench.spp_window_features(net.backbone, net.head, image, boxes, scales, (1, 2, 3, 6),
                                               timer=timer, memory_format=memory_format)
        maps = [net.backbone(nets.preprocess(image, s, ZF5)[None])[0] for s in scales]
        pooled = spp.pool_windows(maps, (60, 80), scales, boxes, ZF5, (1, 2, 3, 6))
        reference = net.head.features(pooled, "fc7")
        plain, plain_info = bench.spp_window_features(net.backbone, net.head, image, boxes, scales, dedup=False)
    assert fast.shape == reference.shape == (len(boxes), 32)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, reference, atol=1e-4, rtol=1e-4)
    assert info.windows == len(boxes) and info.unique_windows <= len(boxes) - 6
    assert plain_info.unique_windows == len(boxes)
    assert sum(info.per_scale.values()) == info.unique_windows
    assert set(timer.seconds) == {"conv", "pool", "fc"}


def test_random_boxes_are_inside_and_seeded():
    boxes = bench.random_boxes(np.random.default_rng(5), (375, 500), 500)
    again = bench.random_boxes(np.random.default_rng(5), (375, 500), 500)
    np.testing.assert_array_equal(boxes, again)
    assert boxes.shape == (500, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() >= 20 - 1e-9
    geometric = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert geometric.min() < 60 and geometric.max() > 250  # spans small to large windows


# ------------------------------------------------------------------------------------------------ end to end


def _tiny_cfg(tmp_path, **extra):
    overrides = {"runs_root": str(tmp_path / "runs"), "run": "bench", "data.dataset": "voc2007",
                 "data.voc_root": str(tmp_path / "no_dataset"), "features.scales": [64, 80, 96],
                 "features.one_scale": 80, "model.fc_dim": 64, "device": "cpu"}
    overrides.update(extra)
    return build_config(None, overrides)


def test_bench_end_to_end_tiny_writes_json(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    out = tmp_path / "bench.json"
    text = bench.run(cfg, n_images=2, windows=50, repeats=1, json_out=out, rcnn_windows=8, rcnn_input_size=64,
                     synth_hw=(90, 120), matmul_shape=(128, 128, 128), threads=1)
    results = json.loads(out.read_text())
    for key in ("speedup_total_1scale", "speedup_conv_1scale", "speedup_total_5scale", "fc_fraction_of_matmul_peak",
                "spp_1scale_seconds_per_image", "device", "matmul_gflops", "pooling"):
        assert key in results, key
    assert results["device"].startswith("cpu")
    for key in ("speedup_total_1scale", "speedup_conv_1scale", "speedup_total_5scale", "fc_fraction_of_matmul_peak"):
        assert 0 < results[key] < float("inf")
    rcnn_mode = results["modes"]["rcnn"]
    assert rcnn_mode["timed_windows"] == 8 and rcnn_mode["scale_factor"] == pytest.approx(50 / 8)
    # R-CNN conv FLOPs: 50 windows x ZF-5 at 64 x 64 (conv1 30, conv2 6, conv3-5 3 cells).
    per_window = 2 * (30 * 30 * 96 * 3 * 49 + 6 * 6 * 256 * 96 * 25 + 9 * (384 * 256 + 384 * 384 + 256 * 384) * 9)
    assert rcnn_mode["flops"]["conv"] == pytest.approx(50 * per_window)
    # fc FLOPs: every R-CNN window, the unique SPP windows: rows x 2 x (12800 x 64 + 64 x 64).
    assert rcnn_mode["flops"]["fc"] == pytest.approx(50 * 2 * (12800 * 64 + 64 * 64))
    spp1 = results["modes"]["spp_1scale"]
    assert spp1["flops"]["fc"] == pytest.approx(spp1["unique_windows"] * 2 * (12800 * 64 + 64 * 64))
    assert results["scales_5scale"] == [64, 80, 96] and results["scales_1scale"] == [80]
    assert "synthetic" in results["images"] and "random boxes" in results["proposals"]
    assert results["pooling"]["max_abs_difference"] == 0.0
    assert "speed-up vs R-CNN" in text and "R-CNN" in text and "SPP 5-scale" in text


def test_bench_takes_dataset_images_and_tops_up_proposals(tmp_path, tiny_devkit):
    cfg = _tiny_cfg(tmp_path, **{"data.voc_root": str(tiny_devkit), "proposals.max_image_side": 0})
    from stages.core.artifacts import Run

    inputs = bench.bench_inputs(cfg, Run(cfg.run_dir), n_images=3, windows=400)
    assert [image_id for image_id, _ in inputs.images] == ["img2"]  # the test split holds one image
    assert inputs.boxes[0].shape == (400, 4)
    assert "selective search" in inputs.box_source and "topped up" in inputs.box_source


def test_bench_rejects_empty_requests(tmp_path):
    with pytest.raises(SppError):
        bench.run(_tiny_cfg(tmp_path), n_images=1, windows=0, repeats=1)
    with pytest.raises(SppError, match="threads"):
        bench.run(_tiny_cfg(tmp_path), n_images=1, windows=5, repeats=1, threads=-1)


def test_bench_cli_passes_precision_threads_and_clock(monkeypatch, tmp_path):
    """The CLI's --fc-dtype/--threads/--clock reach bench.run (the one-thread CPU-time table of BENCHMARKS.md)."""
    from click.testing import CliRunner

    from sppcli.cli import cli

    seen = {}
    monkeypatch.setattr(bench, "run", lambda cfg, **kwargs: seen.update(kwargs) or "report")
    result = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--num-images", "2", "--fc-dtype",
                                      "bfloat16", "--threads", "1", "--clock", "cpu"])
    assert result.exit_code == 0, result.output
    assert (seen["n_images"], seen["fc_dtype"], seen["threads"], seen["clock"]) == (2, "bfloat16", 1, "cpu")
    bad = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--clock", "sundial"])
    assert bad.exit_code != 0 and "sundial" in bad.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tf32_channels_last_keeps_scores():
    """The GPU speed settings (TF32 matmuls and convolutions, channels-last) change fc7 features and linear
    scores by less than 1e-2 relative to float32 on the CPU."""
    net = _tiny_net(fc_dim=256)
    image = _image(120, 160, seed=4)
    boxes = bench.random_boxes(np.random.default_rng(1), (120, 160), 300)
    scales = (96, 128)
    weights = torch.randn(256, 21)
    with torch.inference_mode():
        reference, _ = bench.spp_window_features(net.backbone, net.head, image, boxes, scales)
        cuda_net = _tiny_net(fc_dim=256).cuda()
        cuda_net.backbone.to(memory_format=torch.channels_last)
        with bench._speed_settings(torch.device("cuda"), 1, cuda_tf32=True):
            fast, _ = bench.spp_window_features(cuda_net.backbone, cuda_net.head, image, boxes, scales,
                                                memory_format=torch.channels_last)
    fast = fast.cpu()
    scale = reference.abs().max()
    assert (fast - reference).abs().max() / scale < 1e-2
    scores, fast_scores = reference @ weights, fast @ weights
    assert (fast_scores - scores).abs().max() / scores.abs().max() < 1e-2


def test_bfloat16_head_keeps_fc7_within_tolerance(tmp_path):
    """The opt-in bfloat16 fc path: fc7 features within 2e-2 of float32 (relative to their largest value)."""
    import copy

    net = _tiny_net(fc_dim=128)
    image = _image(60, 80, seed=6)
    boxes = bench.random_boxes(np.random.default_rng(2), (60, 80), 60, min_side=8)
    head16 = copy.deepcopy(net.head).to(torch.bfloat16)
    with torch.inference_mode():
        exact, _ = bench.spp_window_features(net.backbone, net.head, image, boxes, (64, 96))
        fast, _ = bench.spp_window_features(net.backbone, head16, image, boxes, (64, 96))
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max() / exact.abs().max() < 2e-2
    with pytest.raises(SppError):
        bench.run(_tiny_cfg(tmp_path), n_images=1, windows=5, repeats=1, fc_dtype="float16")


def test_phase_timer_clocks():
    timer = bench.PhaseTimer(torch.device("cpu"), clock="cpu")
    with timer("busy"):
        sum(i * i for i in range(200000))  # CPU work is counted
    with timer("idle"):
        import time
        time.sleep(0.05)  # waiting is not
    assert timer.seconds["busy"] > 0 and timer.seconds["idle"] < 0.04
    with pytest.raises(SppError):
        bench.PhaseTimer(torch.device("cuda"), clock="cpu")
    with pytest.raises(SppError):
        bench.PhaseTimer(torch.device("cpu"), clock="sundial")


def test_bench_uses_the_runs_stored_proposals(tmp_path, tiny_devkit):
    from stages import proposals
    from stages.core.artifacts import Run
    from stages.core.proposals import load_proposals

    cfg = _tiny_cfg(tmp_path, **{"data.voc_root": str(tiny_devkit), "proposals.workers": 1})
    proposals.run(cfg, "test")
    stored = load_proposals(Run(cfg.run_dir), "test").boxes("img2")
    inputs = bench.bench_inputs(cfg, Run(cfg.run_dir), n_images=1, windows=len(stored) + 3)
    assert "stored selective-search proposals" in inputs.box_source and "topped up with 3" in inputs.box_source
    np.testing.assert_array_equal(inputs.boxes[0][:len(stored)], stored)
