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
from stages.core import fccompress, nets, rcnn, spp
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
    # a compressed head through detect's fc path: int8 takes its own input (uint8 rows where it pools them so)
    with torch.inference_mode():
        for compression, tolerance in (("int8", 5e-2), ("svd", 1.0)):
            small = fccompress.compress_head(net.head, compression, (8, 4))
            features = rcnn.rcnn_window_features(net.backbone, small, image, boxes, ZF5, pyramid, input_size=64,
                                                 layer="fc7")
            assert features.shape == batched.shape and features.dtype == torch.float32
            assert float((features - batched).norm() / batched.norm()) < tolerance, compression


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


def test_pool_windows_pools_sorted_scales_in_place_exactly():
    """Boxes sorted by scale (as detect's distinct windows are) are pooled straight into the result's rows: the
    same values as the scatter path of unsorted boxes, and gradients still reach the maps in training."""
    rng = np.random.default_rng(7)
    scales = (256, 512, 1024)  # e = 208 * 60 / side spans them for 4..69 px boxes
    fmaps = [torch.randn(8, s // 16, s * 4 // 3 // 16) for s in scales]
    boxes = bench.random_boxes(rng, (60, 80), 60, min_side=4)
    order = np.argsort(spp.choose_scale(boxes, (60, 80), scales), kind="stable")
    assert len(set(spp.choose_scale(boxes, (60, 80), scales).tolist())) == 3
    unsorted = spp.pool_windows(fmaps, (60, 80), scales, boxes, ZF5)
    in_place = spp.pool_windows(fmaps, (60, 80), scales, boxes[order], ZF5)
    assert torch.equal(in_place, unsorted[torch.from_numpy(order)])
    # spp_pool into rows of a bfloat16 tensor: the float32 values converted as they are written
    cells = torch.from_numpy(spp.boxes_to_cells(spp.scale_boxes(boxes, (60, 80), 512), fmaps[1].shape[-2:], ZF5))
    target = torch.zeros(70, spp.spp_dim(8), dtype=torch.bfloat16)
    returned = spp.spp_pool(fmaps[1], cells, out=target[5:65])
    assert returned.data_ptr() == target[5:].data_ptr()
    assert torch.equal(target[5:65], spp.spp_pool(fmaps[1], cells).to(torch.bfloat16)) and target[:5].eq(0).all()
    with pytest.raises(ValueError, match="out has shape"):
        spp.spp_pool(fmaps[1], cells, out=target[:10])
    trained = [f.clone().requires_grad_(True) for f in fmaps]
    spp.pool_windows(trained, (60, 80), scales, boxes[order], ZF5).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in trained)


def test_head_rows_is_the_fc_path_in_batches():
    """detect's fc path (fcfeatures.head_rows): batches of rows converted to the head's type, float32 out, the
    same rows whatever the batch; empty input keeps the layer's width."""
    import copy

    from stages.core import fcfeatures

    net = _tiny_net(fc_dim=16)
    pooled = torch.relu(torch.randn(23, net.head.in_features))
    with torch.inference_mode():
        whole = fcfeatures.head_rows(net.head, pooled, "fc7", batch=100)
        batched = fcfeatures.head_rows(net.head, pooled, "fc7", batch=5)
        head16 = copy.deepcopy(net.head).to(torch.bfloat16)
        half = fcfeatures.head_rows(head16, pooled, "fc7", batch=5)
        expected = head16.features(pooled.to(torch.bfloat16), "fc7").float()
        empty = {layer: fcfeatures.head_rows(net.head, pooled[:0], layer).shape for layer in
                 ("fc6", "fc7", "softmax", "pool5")}
    torch.testing.assert_close(batched, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole, net.head.features(pooled, "fc7"), atol=0, rtol=0)
    assert half.dtype == torch.float32 and torch.equal(half, expected)
    assert empty == {"fc6": (0, 16), "fc7": (0, 16), "softmax": (0, 5), "pool5": (0, net.head.in_features)}


def test_every_mode_times_every_fc_variant_with_the_same_fc_code(monkeypatch):
    """R-CNN and SPP mode feed their rows to the same fc code (``fcfeatures.head_rows``) with the same heads, each
    variant timed in the run; the selected one is the mode's fc phase; the order rotates from run to run."""
    import copy

    from stages.bench import measure
    from stages.core import fcfeatures

    net = _tiny_net(fc_dim=16)
    heads = {"float32": net.head, "bfloat16": copy.deepcopy(net.head).to(torch.bfloat16)}
    setup = measure._Setup(backbone=net.backbone, head=heads["bfloat16"], device=torch.device("cpu"),
                           pyramid=(1, 2, 3, 6), scales={"spp_1scale": [64], "spp_5scale": [48, 64]}, rule="code",
                           fc_batch=16, rcnn_keep=4, rcnn_input=64, rcnn_batch=4,
                           memory_format=torch.contiguous_format, heads=heads, selected="bfloat16")
    calls = []
    real = fcfeatures.head_rows

    def recording(head, rows, layer="fc7", batch=4096):
        calls.append((id(head), rows.dtype, rows.shape[1], layer, batch))
        return real(head, rows, layer, batch)

    monkeypatch.setattr(fcfeatures, "head_rows", recording)
    image = _image(60, 80, seed=3)
    boxes = bench.random_boxes(np.random.default_rng(3), (60, 80), 12, min_side=8)
    runs = {}
    with torch.inference_mode():
        for mode in ("rcnn", "spp_1scale"):
            for turn in (0, 1):
                calls.clear()
                runs[mode, turn] = (bench._time_mode(mode, setup, image, boxes, turn=turn), list(calls))
    by_head = {id(head): name for name, head in heads.items()}
    for (mode, turn), (result, seen) in runs.items():
        assert [by_head[c[0]] for c in seen] == (["float32", "bfloat16"] if turn == 0 else ["bfloat16", "float32"])
        assert {c[1:] for c in seen} == {(torch.float32, net.head.in_features, "fc7", 16)}  # pooled float32 rows
        assert set(result["fc_variants"]) == {"float32", "bfloat16"}
        assert result["seconds"]["fc"] == result["fc_variants"]["bfloat16"]["seconds"] > 0
        rows = 12 if mode == "rcnn" else result["unique_windows"]
        per_row = 2 * (net.head.in_features * 16 + 16 * 16)
        assert all(v["flops"] == rows * per_row for v in result["fc_variants"].values())


def test_matmul_gflops_is_the_best_timed_call_after_warmups(monkeypatch):
    """A GEMM's rate is its fastest timed call (a busy moment only slows calls down), never a warm-up's."""
    from stages.bench import measure
    from stages.core import timing

    calls = []
    monkeypatch.setattr(measure, "_operands", lambda kernel, shape, dtype, device: lambda: calls.append(kernel))
    stamps = iter([0.0, 0.5, 0.5, 0.7, 0.7, 1.1])  # start / end of each timed call: 0.5, 0.2, 0.4 s
    monkeypatch.setitem(timing.CLOCKS, "wall", lambda: next(stamps))
    result = bench.matmul_gflops(torch.device("cpu"), (10, 20, 30), repeats=3, kernel="linear", warmups=2)
    assert calls == ["linear"] * 5  # 2 warm-ups, then 3 timed calls
    assert result["seconds"] == pytest.approx(0.2) and result["repeats"] == 3 and result["warmups"] == 2
    assert result["gflops"] == pytest.approx(2 * 10 * 20 * 30 / 0.2 / 1e9)
    assert result["median_gflops"] == pytest.approx(2 * 10 * 20 * 30 / 0.4 / 1e9)


def test_matmul_peak_is_the_best_over_shapes_kernels_and_passes(monkeypatch):
    from stages.bench import measure

    shapes = {"fc6": (4, 8, 16), "fc7": (4, 16, 16), "square": (32, 32, 32)}
    names = {shape: name for name, shape in shapes.items()}
    rates = {("fc6", "linear"): 50.0, ("fc7", "linear"): 80.0, ("square", "linear"): 60.0, ("square", "mm"): 70.0,
             ("fc6", "int8_linear"): 30.0, ("fc7", "int8_linear"): 40.0, ("square", "int8_linear"): 35.0}
    seen, scale, missing = [], [1.0], set()

    def fake(device, shape, repeats, dtype, clock, *, kernel, warmups):
        if kernel in missing:
            raise RuntimeError(f"no {kernel} here")
        seen.append((names[shape], kernel))
        return {"shape_mkn": list(shape), "dtype": dtype, "kernel": kernel,
                "gflops": rates[names[shape], kernel] * scale[0]}

    monkeypatch.setattr(measure, "matmul_gflops", fake)
    cpu = torch.device("cpu")
    before = measure.matmul_peak(cpu, "float32", shapes, when="before")
    assert seen == [("fc6", "linear"), ("fc7", "linear"), ("square", "linear"), ("square", "mm")]  # mm: square only
    assert before["gflops"] == 80.0 and before["best"] == {"shape": "fc7", "shape_mkn": [4, 16, 16],
                                                           "kernel": "linear", "when": "before"}
    scale[0] = 0.5  # a busy machine afterwards: the peak stays the best of both passes
    after = measure.matmul_peak(cpu, "float32", shapes, previous=before, when="after")
    assert after["gflops"] == 80.0 and after["best"]["when"] == "before" and len(after["entries"]) == 8
    scale[0] = 1.0
    missing.add("int_mm")  # an int8 GEMM this build lacks: the other one counts, and why is said
    int8 = measure.matmul_peak(cpu, "int8", shapes)
    assert int8["gflops"] == 40.0 and int8["best"]["kernel"] == "int8_linear" and "int_mm" in int8["unavailable"]
    missing.add("int8_linear")
    none = measure.matmul_peak(cpu, "int8", shapes)
    assert none["gflops"] is None and "no int_mm here" in none["not_measured"] and not none["entries"]
    assert measure.peak_dtype("int8", "float32") == "int8" and measure.peak_dtype("svd", "bfloat16") == "bfloat16"


def test_sustained_rate_is_all_calls_over_their_time_with_fifths(monkeypatch):
    """The rate a GEMM holds: every call after one untimed warm-up until the time is spent, all FLOPs over all the
    time (not the best call), and the rate of each fifth of that time, which shows a machine slowing down."""
    from stages.bench import measure
    from stages.core import timing

    calls = []
    monkeypatch.setattr(measure, "_operands", lambda kernel, shape, dtype, device: lambda: calls.append(kernel))
    durations = [0.1] * 4 + [0.3] * 4  # fast at first, then three times slower
    stamps = iter(t for d in durations for t in (0.0, d))
    monkeypatch.setitem(timing.CLOCKS, "wall", lambda: next(stamps))
    held = measure.sustained_gflops(torch.device("cpu"), "float32", (10, 20, 30), "mm", seconds=1.6)
    assert calls == ["mm"] * 9 and held["calls"] == 8 and held["seconds"] == pytest.approx(1.6)
    flops = 2 * 10 * 20 * 30
    assert held["gflops"] == pytest.approx(8 * flops / 1.6 / 1e9)
    assert held["gflops_by_fifth"][0] == pytest.approx(flops / 0.1 / 1e9)  # the first fifth: fast calls
    assert held["gflops_by_fifth"][-1] == pytest.approx(flops / 0.3 / 1e9)  # the last: slow ones
    assert len(held["gflops_by_fifth"]) == 5
    stamps = iter([0.0, 3.0, 0.0, 0.0, 0.0, 0.1])  # a long call, a zero-time one, a short one: no empty division
    calls.clear()
    held = measure.sustained_gflops(torch.device("cpu"), "float32", (10, 20, 30), "mm", seconds=3.05)
    # middles at 1.5, 3.0 and 3.05 of 3.1 s: the long call in the third fifth, the other two in the last
    assert held["calls"] == 3 and held["gflops_by_fifth"][:2] == [None, None]
    assert held["gflops_by_fifth"][2] == pytest.approx(flops / 3.0 / 1e9)
    assert held["gflops_by_fifth"][4] == pytest.approx(2 * flops / 0.1 / 1e9)


def test_matmul_peak_holds_its_best_gemm_and_keeps_a_previous_hold(monkeypatch):
    from stages.bench import measure

    shapes = {"fc6": (4, 8, 16), "square": (32, 32, 32)}
    rates = {(4, "linear"): 50.0, (32, "linear"): 60.0, (32, "mm"): 70.0}
    monkeypatch.setattr(measure, "matmul_gflops", lambda device, shape, repeats, dtype, clock, *, kernel, warmups: {
        "shape_mkn": list(shape), "dtype": dtype, "kernel": kernel, "gflops": rates[shape[0], kernel]})
    held = []
    monkeypatch.setattr(measure, "sustained_gflops", lambda device, dtype, shape, kernel, seconds, clock: held.append(
        (shape, kernel, seconds)) or {"gflops": 30.0, "seconds": seconds})
    cpu = torch.device("cpu")
    before = measure.matmul_peak(cpu, "float32", shapes, when="before")
    assert "sustained" not in before and not held
    after = measure.matmul_peak(cpu, "float32", shapes, previous=before, when="after", sustained_seconds=2.0)
    assert held == [((32, 32, 32), "mm", 2.0)]  # the best GEMM, held
    assert after["sustained"] == {"when": "after", "gflops": 30.0, "seconds": 2.0}
    again = measure.matmul_peak(cpu, "float32", shapes, previous=after, when="later")
    assert again["sustained"] == after["sustained"] and len(held) == 1


def test_matmul_peak_runs_every_kernel_on_this_cpu():
    from stages.bench import measure

    shapes = {"fc6": (8, 64, 32), "fc7": (8, 32, 32), "square": (64, 64, 64)}
    for dtype, kernels in measure.GEMM_KERNELS.items():
        peak = measure.matmul_peak(torch.device("cpu"), dtype, shapes, repeats=2, warmups=1)
        assert peak["gflops"] == max(entry["gflops"] for entry in peak["entries"]) > 0, dtype
        assert {entry["kernel"] for entry in peak["entries"]} | set(peak["unavailable"]) == set(kernels)
        assert set(peak["unavailable"]) <= {"int_mm"}  # only the plain int8 GEMM may be missing from a build
        assert all(entry["repeats"] == 2 and entry["gflops"] >= entry["median_gflops"] for entry in peak["entries"])


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
                     synth_hw=(90, 120), matmul_shape=(128, 128, 128), threads=1, sustained_seconds=0.05)
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
    # The GEMM peak of every type the fc variants run in, measured before and after the timed runs; each the
    # best of its measurements, at fc6's and fc7's own shapes (M = the 50 windows) and the square one.
    peaks = results["matmul_peaks"]
    assert set(peaks) == {"float32", "bfloat16", "int8"}
    for dtype, peak in peaks.items():
        assert peak["gflops"] == max(entry["gflops"] for entry in peak["entries"]), dtype
        assert {entry["when"] for entry in peak["entries"]} == {"before", "after"}
        assert {tuple(entry["shape_mkn"]) for entry in peak["entries"]} == {(50, 12800, 64), (50, 64, 64),
                                                                            (128, 128, 128)}
        assert all(entry["threads"] == 1 and entry["gflops"] >= entry["median_gflops"] for entry in peak["entries"])
    assert results["matmul"] is not None and results["matmul_gflops"] == peaks["float32"]["gflops"]
    # Every fc variant in every mode of the same runs: its rate against its own type's peak, its totals and ratios.
    variants = results["fc_variants"]["variants"]
    assert set(variants) == {"float32", "bfloat16", "svd", "int8"}
    own_type = {"float32": "float32", "bfloat16": "bfloat16", "svd": "float32", "int8": "int8"}
    for name, data in variants.items():
        modes = data["modes"]
        assert data["peak_dtype"] == own_type[name] and data["peak_gflops"] == peaks[own_type[name]]["gflops"]
        rate = modes["spp_1scale"]["fc_gflops_per_s"]
        assert data["fc_fraction_of_peak"] == pytest.approx(rate / peaks[own_type[name]]["gflops"])
        held = peaks[own_type[name]]["sustained"]  # the best GEMM held back to back after the timed runs
        assert held["when"] == "after" and held["seconds"] >= 0.05 and held["kernel"] == peaks[own_type[name]][
            "best"]["kernel"]
        assert data["fc_fraction_of_sustained"] == pytest.approx(rate / held["gflops"])
        assert data["speedup_total_1scale"] == pytest.approx(modes["rcnn"]["total_seconds"]
                                                            / modes["spp_1scale"]["total_seconds"])
        assert data["speedup_conv_1scale"] == results["speedup_conv_1scale"]
        # the same fc layers in both modes: R-CNN's every window, SPP's distinct ones, the same FLOPs per row
        assert modes["rcnn"]["fc_flops"] / 50 == pytest.approx(data["flops_per_window"])
        assert modes["spp_1scale"]["fc_flops"] / spp1["unique_windows"] == pytest.approx(data["flops_per_window"])
    selected = variants["float32"]
    assert results["fc_fraction_of_matmul_peak"] == selected["fc_fraction_of_peak"]
    assert results["fc_fraction_of_sustained"] == selected["fc_fraction_of_sustained"]
    for mode in ("rcnn", "spp_1scale", "spp_5scale"):  # the main table is the selected variant's
        assert selected["modes"][mode]["fc_seconds"] == pytest.approx(results["modes"][mode]["seconds"]["fc"])
    assert "GEMM peaks" in text and "% of peak" in text and "held" in text and "of the rate it holds" in text


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
    for held in (-1.0, float("nan")):
        with pytest.raises(SppError, match="sustained_seconds"):
            bench.run(_tiny_cfg(tmp_path), n_images=1, windows=5, repeats=1, sustained_seconds=held)


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
    assert seen["sustained_seconds"] == 6.0  # the CLI holds each best GEMM by default
    result = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--sustained-seconds", "0"])
    assert result.exit_code == 0 and seen["sustained_seconds"] == 0.0
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
