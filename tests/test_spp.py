"""SPP layer, scale choice and window -> conv5 mapping (SPEC.md §1-2): hand-computed values and loop references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import roi_pool

from stages.core import quant, spp
from stages.core.nets import BackboneSpec
from stages.core.spp import (boxes_to_cells, choose_scale, pool_windows, scale_boxes, spp_dim, spp_pool,
                             spp_pool_full, spp_pool_naive_per_level, spp_pool_reference)

ZF5 = BackboneSpec(name="zf5", stride=16, channels=256, offset0=21.0, offset=6.5, pixel_mode="bgr128")
PAPER_SCALES = (480, 576, 688, 874, 1200)


def test_spp_dim():
    assert spp_dim(256, (1, 2, 3, 6)) == 12800  # SPEC §1: 50 bins x 256
    assert spp_dim(96, (1, 2)) == 96 * 5


# ------------------------------------------------------------------------------------------------ scale choice


def test_choose_scale_code_rule_hand_values():
    # 375x500 image, 100x100 box: e = floor(208 * 375 / 100 + 0.5) = 780 -> |688 - 780| = 92 < |874 - 780| = 94.
    assert choose_scale(np.array([[0, 0, 100, 100]]), (375, 500), PAPER_SCALES).tolist() == [2]
    # 50x200 box has the same sqrt(area) = 100.
    assert choose_scale(np.array([[10, 20, 60, 220]]), (375, 500), PAPER_SCALES).tolist() == [2]
    # A 300x300 box: e = floor(260 + 0.5) = 260 -> the smallest scale; a 20x20 box: e = 3900 -> the largest.
    got = choose_scale(np.array([[0, 0, 300, 300], [5, 5, 25, 25]]), (375, 500), PAPER_SCALES)
    assert got.tolist() == [0, 4]
    assert got.dtype == np.int64


def test_choose_scale_rounds_half_up_not_to_even():
    # 480x480 box in a 375-short image: 208 * 375 / 480 = 162.5 exactly. MATLAB round -> 163 (banker's gives 162).
    box = np.array([[0, 0, 480, 480]])
    assert choose_scale(box, (375, 600), (160, 165)).tolist() == [1]  # |165-163| = 2 < |160-163| = 3


def test_choose_scale_ties_take_the_first_scale():
    # 264-short image, 104x104 box: e = 208 * 264 / 104 = 528, halfway between 480 and 576.
    box = np.array([[0, 0, 104, 104]])
    assert choose_scale(box, (264, 400), (480, 576)).tolist() == [0]
    assert choose_scale(box, (264, 400), (576, 480)).tolist() == [0]


def test_choose_scale_paper_rule_differs_from_code_rule():
    # 100x100 box, short side 375: at scale s its side is 100 s / 375. Area closest to 224^2: s = 874
    # (233.1^2 = 54321, |diff| = 4145) beats 688 (183.5^2 = 33660, |diff| = 16516). The code rule says 688.
    box = np.array([[0, 0, 100, 100]])
    assert choose_scale(box, (375, 500), PAPER_SCALES, rule="paper").tolist() == [3]
    assert choose_scale(box, (375, 500), PAPER_SCALES, rule="code").tolist() == [2]
    with pytest.raises(ValueError):
        choose_scale(box, (375, 500), PAPER_SCALES, rule="nope")


def test_choose_scale_empty_and_degenerate():
    assert choose_scale(np.zeros((0, 4)), (375, 500), PAPER_SCALES).shape == (0,)
    # A zero-width box counts as one pixel wide instead of dividing by zero.
    assert choose_scale(np.array([[5, 5, 5, 5]]), (375, 500), PAPER_SCALES).tolist() == [4]


# ------------------------------------------------------------------------------------------------ box scaling


def test_scale_boxes_hand_values():
    # Our [9, 19, 109, 59) is VOC's 1-based inclusive (10, 20, 109, 59). Short side 375 -> 688: factor 687/374.
    got = scale_boxes(np.array([[9.0, 19.0, 109.0, 59.0]]), (375, 500), 688)
    expected = np.array([[9 * 687 / 374 + 1, 19 * 687 / 374 + 1, 108 * 687 / 374 + 1, 58 * 687 / 374 + 1]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[0, 0], 17.532085561497325)
    # The whole image maps onto 1 .. s along the short side (the formula's fixed points).
    whole = scale_boxes(np.array([[0.0, 0.0, 500.0, 375.0]]), (375, 500), 688)
    np.testing.assert_allclose(whole[0, [0, 1, 3]], [1.0, 1.0, 688.0])
    np.testing.assert_allclose(whole[0, 2], 499 * 687 / 374 + 1)


# ------------------------------------------------------------------------------------------------ box -> cells


def _cells(x1, y1, x2, y2, fmap_hw=(42, 56)):
    return boxes_to_cells(np.array([[x1, y1, x2, y2]], dtype=np.float64), fmap_hw, ZF5)[0].tolist()


def test_boxes_to_cells_hand_values():
    # x: X0 = floor((100 - 21 + 6.5)/16 + 0.5) + 1 = floor(5.84375) + 1 = 6;
    #    X1 = ceil((200 - 21 - 6.5)/16 - 0.5) + 1 = ceil(10.28125) + 1 = 12      -> 0-based 5, 11.
    # y: Y0 = floor((40 - 14.5)/16 + 0.5) + 1 = floor(2.09375) + 1 = 3;
    #    Y1 = ceil((90 - 27.5)/16 - 0.5) + 1 = ceil(3.40625) + 1 = 5              -> 0-based 2, 4.
    assert _cells(100, 40, 200, 90) == [5, 2, 11, 4]
    # Whole 688-short image (x1' = 1, x2' = 688): X0 = floor(-0.34375) + 1 = 0 -> clamped to 1;
    # X1 = ceil(40.78125) + 1 = 42 -> within a 42-wide map. Along y the map is only 40 high: clamped to 40.
    assert _cells(1, 1, 688, 688, fmap_hw=(40, 42)) == [0, 0, 41, 39]


def test_boxes_to_cells_rounds_half_up():
    # x1' = 54.5: (54.5 - 14.5)/16 = 2.5 -> floor(3.0) + 1 = 4 (Python's round(2.5) = 2 would give 3).
    assert _cells(54.5, 100, 300, 200)[0] == 3
    assert _cells(54.49, 100, 300, 200)[0] == 2
    # x2' = 67.5: (67.5 - 27.5)/16 - 0.5 = 2.0 -> ceil 2 -> X1 = 3; a hair more tips it to 4.
    assert _cells(1, 100, 67.5, 200)[2] == 2
    assert _cells(1, 100, 67.6, 200)[2] == 3


def test_boxes_to_cells_degenerate_windows():
    # x1' = 105, x2' = 106: X0 = floor(6.15625) + 1 = 7, X1 = ceil(4.40625) + 1 = 6 -> both (7 + 6)/2 = 6 (C division).
    assert _cells(105, 100, 106, 200)[0::2] == [5, 5]
    # Near the origin: X0 = 0, X1 = ceil(-2.09375) + 1 = -1 -> (0 - 1)/2 = 0 (truncated) -> clamped to 1.
    assert _cells(1, 1, 2, 2) == [0, 0, 0, 0]
    # Past the right edge of a 10-wide map: clamped to the last cell.
    x0, _, x1, _ = _cells(400, 1, 420, 60, fmap_hw=(42, 10))
    assert (x0, x1) == (9, 9)


def test_boxes_to_cells_uses_the_spec_offsets():
    other = BackboneSpec(name="vgg16", stride=16, channels=512, offset0=8.5, offset=6.5, pixel_mode="imagenet")
    # X0 = floor((100 - 8.5 + 6.5)/16 + 0.5) + 1 = floor(6.625) + 1 = 7; X1 = ceil((200 - 15)/16 - 0.5) + 1 = 12 + 1.
    got = boxes_to_cells(np.array([[100.0, 100.0, 200.0, 200.0]]), (42, 56), other)[0].tolist()
    assert got == [6, 6, 12, 12]


# ------------------------------------------------------------------------------------------------ pooling


def _random_cells(rng, n_windows, height, width, max_w=None):
    x0 = rng.integers(0, width, n_windows)
    y0 = rng.integers(0, height, n_windows)
    x1 = np.minimum(x0 + rng.integers(0, max_w or width, n_windows), width - 1)
    y1 = np.minimum(y0 + rng.integers(0, max_w or height, n_windows), height - 1)
    cells = np.stack([x0, y0, x1, y1], axis=1)
    # Always include 1-cell windows, the whole map and windows touching each border.
    fixed = np.array([[0, 0, 0, 0], [width - 1, height - 1, width - 1, height - 1], [0, 0, width - 1, height - 1],
                      [width - 1, 0, width - 1, height - 1], [0, height - 1, width - 1, height - 1]])
    return torch.from_numpy(np.concatenate([cells, fixed]))


def test_spp_pool_layout_hand_values():
    # 2 channels, 2x2 map, whole-map window, pyramid (1, 2): [max c0, max c1, c0 (y, x) row-major, c1 (y, x)].
    fmap = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[8.0, 7.0], [6.0, 5.0]]])
    got = spp_pool(fmap, torch.tensor([[0, 0, 1, 1]]), (1, 2))
    assert got.tolist() == [[4.0, 8.0, 1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]]
    # Pyramid order is the concatenation order.
    assert spp_pool(fmap, torch.tensor([[0, 0, 1, 1]]), (2, 1)).tolist() == [[1, 2, 3, 4, 8, 7, 6, 5, 4, 8]]


def test_spp_pool_bins_hand_values():
    # One row of 5 cells, window = the row, 2 x-bins: [floor(0), ceil(2.5)) = [0, 3), [floor(2.5), ceil(5)) = [2, 5).
    # One row (h = 1 < n) makes both y-bins [0, 1): the 2x2 level repeats the row.
    fmap = torch.tensor([[[9.0, 1.0, 5.0, 2.0, 3.0]]])
    assert spp_pool(fmap, torch.tensor([[0, 0, 4, 0]]), (2,)).tolist() == [[9.0, 5.0, 9.0, 5.0]]
    # Window of 2 cells (x 3..4) and 3 bins (w < n): [0, 1), [0, 2), [1, 2) from x0 = 3 -> 2, 3, 3 (three rows).
    assert spp_pool(fmap, torch.tensor([[3, 0, 4, 0]]), (3,)).tolist() == [[2.0, 3.0, 3.0] * 3]


@pytest.mark.parametrize("method", ["table", "roi_pool", "auto"])
@pytest.mark.parametrize("pyramid", [(1, 2, 3, 6), (6, 3, 2, 1), (1, 2, 4, 7), (5, 3), (4,), (1,), (2, 2)])
def test_spp_pool_matches_loop_reference(pyramid, method):
    rng = np.random.default_rng(sum(pyramid))
    for height, width in [(1, 1), (3, 2), (7, 13), (13, 13), (11, 17), (33, 70)]:
        fmap = torch.randn(4, height, width)
        cells = _random_cells(rng, 40, height, width)
        expected = spp_pool_reference(fmap, cells, pyramid)
        got = spp_pool(fmap, cells, pyramid, method=method)
        assert got.shape == (len(cells), spp_dim(4, pyramid))
        assert torch.equal(got, expected), (height, width, pyramid)


def test_pooling_method_by_cost():
    # A 43 x 57 map: one whole-map window at levels (3, 2) costs 43 * 57 * 2 cells in roi_pool against a table of
    # (4 + 1) * (4 + 1) maps (bins of 14-19 cells: a = b = 4) * 2.5 -> roi_pool; 2,000 such windows -> table.
    whole = np.array([[0, 0, 56, 42]])
    assert spp.pooling_method((43, 57), whole, (3, 2)) == "roi_pool"
    assert spp.pooling_method((43, 57), np.repeat(whole, 2000, axis=0), (3, 2)) == "table"
    # Where the two costs meet: 43 * 57 * 2 * k < 2.5 * 25 * 43 * 57  <=>  k < 31.25 windows.
    assert spp.pooling_method((43, 57), np.repeat(whole, 31, axis=0), (3, 2)) == "roi_pool"
    assert spp.pooling_method((43, 57), np.repeat(whole, 32, axis=0), (3, 2)) == "table"
    assert spp.pooling_method((43, 57), whole[:0], (3, 2)) == "table"  # nothing to pool


def test_spp_pool_auto_uses_the_cheaper_method(monkeypatch):
    calls = []
    real = spp._roi_pool_or_table
    monkeypatch.setattr(spp, "_roi_pool_or_table", lambda *a: calls.append("roi_pool") or real(*a))
    fmap = torch.rand(8, 43, 57)
    few = torch.tensor([[0, 0, 56, 42], [3, 4, 20, 30]])
    assert torch.equal(spp_pool(fmap, few, (1, 2, 3)), spp_pool_reference(fmap, few, (1, 2, 3)))
    assert calls == ["roi_pool", "roi_pool"]  # levels 3 and 2 (1 is derived from 2)
    calls.clear()
    many = few.repeat(100, 1)
    assert torch.equal(spp_pool(fmap, many, (1, 2, 3)), spp_pool_reference(fmap, many, (1, 2, 3)))
    assert calls == []


def test_spp_pool_chunks_many_windows(monkeypatch):
    # Force many small gather chunks: the stitched result must equal the reference row for row.
    monkeypatch.setattr(spp, "_GATHER_BYTES", 4000)
    rng = np.random.default_rng(7)
    fmap = torch.rand(3, 15, 21)
    cells = _random_cells(rng, 90, 15, 21)
    assert torch.equal(spp_pool(fmap, cells), spp_pool_reference(fmap, cells))
    # a uint8 map, pooled in uint8 in chunks, and in the bin-major layout: the same values, columns reordered
    small = (fmap * 255).round().to(torch.uint8)
    reference = spp_pool_reference(small.float(), cells)
    assert torch.equal(spp_pool(small, cells).float(), reference)
    yxc = spp_pool(small, cells, layout="yxc")
    assert torch.equal(yxc.float(), reference[:, spp.yxc_order(3)])


def test_yxc_order_by_hand():
    # 2 channels, levels 1 and 2: level 1 keeps (c0, c1); level 2's (c, y, x) columns 2..9 go bin by bin
    assert spp.yxc_order(2, (1, 2)).tolist() == [0, 1, 2, 6, 3, 7, 4, 8, 5, 9]
    with pytest.raises(ValueError, match="unknown pooled layout"):
        spp_pool(torch.rand(2, 4, 4), [[0, 0, 3, 3]], (1, 2), layout="xyc")


def test_spp_pool_naive_per_level_matches_reference():
    rng = np.random.default_rng(1)
    fmap = torch.rand(8, 20, 30)
    cells = _random_cells(rng, 60, 20, 30)
    assert torch.equal(spp_pool_naive_per_level(fmap, cells), spp_pool_reference(fmap, cells))


def test_spp_pool_large_windows_float64_and_half():
    rng = np.random.default_rng(2)
    fmap = torch.randn(2, 75, 110, dtype=torch.float64)
    cells = _random_cells(rng, 30, 75, 110)
    assert torch.equal(spp_pool(fmap, cells), spp_pool_reference(fmap, cells))
    half = fmap.half()  # the cache's dtype: pooled in float32 (roi_pool's bin arithmetic must not run in half)
    got = spp_pool(half, cells)
    assert got.dtype == torch.float32
    assert torch.equal(got, spp_pool_reference(half.float(), cells))


def test_roi_pool_without_torchvision_is_its_kernel_and_training_keeps_its_gradient():
    # Inference calls torchvision's compiled roi_pool directly (core.vision_ops); with gradients flowing through
    # the map it goes through torchvision.ops, whose package registers the backward.
    rng = np.random.default_rng(3)
    fmap = torch.from_numpy(rng.normal(size=(4, 11, 13))).float()
    cells = torch.from_numpy(np.array([[0, 0, 12, 10], [2, 3, 7, 9], [5, 5, 5, 5]], dtype=np.int64))
    rois = torch.cat([torch.zeros(3, 1), cells.float()], dim=1)
    with torch.inference_mode():
        for n in (1, 2, 3, 6):
            assert torch.equal(spp._roi_pool_level(fmap, cells, n), roi_pool(fmap[None], rois, (n, n), 1.0))
    learning = fmap.clone().requires_grad_()
    spp._roi_pool_level(learning, cells, 3).sum().backward()
    assert learning.grad is not None and learning.grad.sum() == 3 * 4 * 9  # each bin's max gets one


def test_roi_pool_is_inexact_for_seven_bins_and_the_fallback_fixes_it():
    # float32 roi_pool: bin = fl(57/7), ceil(7 * bin) = 58, so the last bin of a 57-cell window reads cell 57,
    # outside the window. Put a spike there: plain roi_pool sees it, spp_pool (exact fallback) must not.
    fmap = torch.zeros(1, 1, 60)
    fmap[0, 0, 57] = 100.0
    cells = torch.tensor([[0, 0, 56, 0]])
    plain = roi_pool(fmap[None], torch.tensor([[0.0, 0.0, 0.0, 56.0, 0.0]]), (1, 7), 1.0)
    assert plain[0, 0, 0, 6] == 100.0
    for method in ("roi_pool", "table"):
        assert spp_pool(fmap, cells, (7,), method=method).max() == 0.0
        assert torch.equal(spp_pool(fmap, cells, (7,), method=method), spp_pool_reference(fmap, cells, (7,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_pool_exactness_predictor_agrees_with_the_kernel(dtype):
    # A 1-row ramp reveals each bin's end (max = last cell); a descending ramp reveals each start.
    extents = np.arange(1, 241)
    for n in (1, 2, 3, 5, 6, 7, 11, 13):
        width = int(extents.max()) + 2
        ramp = torch.arange(width, dtype=dtype).view(1, 1, 1, width)
        rois = torch.tensor([[0, 0, 0, w - 1, 0] for w in extents], dtype=dtype)
        ends = roi_pool(ramp, rois, (1, n), 1.0)[:, 0, 0, :].numpy().astype(np.int64) + 1
        starts = (width - 1 - roi_pool(-ramp + width - 1, rois, (1, n), 1.0)[:, 0, 0, :].numpy()).astype(np.int64)
        exact_start, exact_end = spp._bin_edges(extents, n)
        kernel_exact = np.all((ends == exact_end) & (starts == exact_start), axis=1)
        np.testing.assert_array_equal(spp._roi_pool_is_exact(extents, n, dtype), kernel_exact)
        if n <= 6:
            assert kernel_exact.all()


@pytest.mark.parametrize("method", ["table", "roi_pool"])
def test_spp_pool_gradient_matches_reference(method):
    rng = np.random.default_rng(3)
    fmap = torch.rand(3, 9, 12, dtype=torch.float64, requires_grad=True)  # no ties: one argmax per bin
    cells = _random_cells(rng, 20, 9, 12)
    weights = torch.randn(len(cells), spp_dim(3, (1, 2, 3, 6)), dtype=torch.float64)
    (spp_pool(fmap, cells, method=method) * weights).sum().backward()
    fast_grad = fmap.grad.clone()
    fmap.grad = None
    (spp_pool_reference(fmap, cells) * weights).sum().backward()
    torch.testing.assert_close(fast_grad, fmap.grad)


def test_spp_pool_rejects_bad_cells_and_handles_empty():
    fmap = torch.rand(2, 4, 5)
    with pytest.raises(ValueError):
        spp_pool(fmap, torch.tensor([[0, 0, 5, 3]]))  # x1 beyond the map
    with pytest.raises(ValueError):
        spp_pool(fmap, torch.tensor([[3, 0, 2, 3]]))  # x0 > x1
    assert spp_pool(fmap, torch.zeros(0, 4, dtype=torch.int64)).shape == (0, spp_dim(2, (1, 2, 3, 6)))


def test_spp_pool_full_equals_whole_map_windows():
    maps = torch.randn(3, 5, 13, 9)
    pooled = spp_pool_full(maps)
    assert pooled.shape == (3, spp_dim(5, (1, 2, 3, 6)))
    for b in range(3):
        assert torch.equal(pooled[b], spp_pool(maps[b], torch.tensor([[0, 0, 8, 12]]))[0])
    # 13 cells, 2 bins: [0, 7) and [6, 13) (the paper's win = ceil(13/2) = 7, stride = floor(13/2) = 6).
    square = torch.zeros(1, 1, 13, 13)
    square[0, 0, 6, 6] = 1.0  # the shared centre cell is in all four bins
    assert spp_pool_full(square, (2,)).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    square[0, 0, 6, 6], square[0, 0, 12, 5] = 0.0, 2.0  # bottom row, x = 5: only bin (y 1, x 0)
    assert spp_pool_full(square, (2,)).tolist() == [[0.0, 0.0, 2.0, 0.0]]


# ------------------------------------------------------------------------------------------------ pool_windows


def test_pool_windows_composes_the_steps_and_keeps_input_order():
    rng = np.random.default_rng(4)
    image_hw = (60, 80)
    scales = (256, 512, 1024)  # e = 208 * 60 / side spans 312 .. 3120 for these 4..40 px boxes
    fmaps = [torch.rand(6, s // 16, s * 4 // 3 // 16) for s in scales]
    x1 = rng.uniform(0, 60, 25)
    y1 = rng.uniform(0, 40, 25)
    boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(4, 40, 25), 80), np.minimum(y1 + rng.uniform(4, 40, 25), 60)],
                     axis=1)
    chosen = choose_scale(boxes, image_hw, scales)
    assert len(set(chosen.tolist())) > 1  # the test exercises several scales
    got = pool_windows(fmaps, image_hw, scales, boxes, ZF5, (1, 2, 3, 6))
    assert got.dtype == torch.float32 and got.shape == (25, spp_dim(6, (1, 2, 3, 6)))
    for i, box in enumerate(boxes):
        k = chosen[i]
        cells = boxes_to_cells(scale_boxes(box[None], image_hw, scales[k]), fmaps[k].shape[-2:], ZF5)
        assert torch.equal(got[i], spp_pool_reference(fmaps[k], torch.from_numpy(cells))[0])
    # An explicit scale index (fine-tuning's random scale) overrides the choice.
    forced = pool_windows(fmaps, image_hw, scales, boxes, ZF5, (1, 2, 3, 6), scale_index=np.zeros(25, np.int64))
    cells0 = boxes_to_cells(scale_boxes(boxes, image_hw, scales[0]), fmaps[0].shape[-2:], ZF5)
    assert torch.equal(forced, spp_pool_reference(fmaps[0], torch.from_numpy(cells0)))
    assert pool_windows(fmaps, image_hw, scales, np.zeros((0, 4)), ZF5).shape == (0, spp_dim(6, (1, 2, 3, 6)))
    with pytest.raises(ValueError):
        pool_windows(fmaps[:2], image_hw, scales, boxes, ZF5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spp_pool_cpu_equals_cuda():
    rng = np.random.default_rng(5)
    for pyramid in [(1, 2, 3, 6), (1, 2, 4, 7)]:
        fmap = torch.randn(32, 42, 57)
        cells = _random_cells(rng, 500, 42, 57)
        cpu = spp_pool(fmap, cells, pyramid)
        for method in ("table", "roi_pool"):
            cuda = spp_pool(fmap.cuda(), cells.cuda(), pyramid, method=method)
            assert cuda.is_cuda
            assert torch.equal(cpu, cuda.cpu()), method
        assert torch.equal(spp_pool_naive_per_level(fmap.cuda(), cells, (1, 2, 3, 6)).cpu(),
                           spp_pool_reference(fmap, cells, (1, 2, 3, 6)))


# ------------------------------------------------------------------------------------------------ uint8 pooling
def test_choose_qparams_by_hand():
    assert quant.choose_qparams(0.0, 255.0) == (1.0, 0)
    assert quant.choose_qparams(2.0, 4.0) == (4.0 / 255, 0)  # the range always holds 0
    scale, zero_point = quant.choose_qparams(-1.0, 1.0)
    assert scale == 2.0 / 255 and zero_point == 128  # 127.5 rounds to even
    assert quant.choose_qparams(0.0, 0.0) == (1.0, 0)  # an all-zero map
    with pytest.raises(ValueError, match="not finite"):
        quant.choose_qparams(0.0, float("inf"))
    rows = quant.QuantizedRows(torch.tensor([[0, 128, 255]], dtype=torch.uint8), scale, zero_point)
    torch.testing.assert_close(rows.dequantize(), torch.tensor([[-128 * scale, 0.0, 127 * scale]]))
    with pytest.raises(ValueError, match="uint8"):
        quant.QuantizedRows(torch.zeros(2, 3), 1.0, 0)


@pytest.mark.parametrize("low", [0.0, -0.5])  # post-ReLU maps, and maps with negative values (zero point > 0)
def test_quantized_pooling_is_the_quantized_float_pooling(low):
    """Quantization is monotonic, so pooling the quantized maps into uint8 gives exactly the quantized float rows,
    with one scale for every scale's map; and the rows are within half a step of the float ones."""
    rng = np.random.default_rng(4)
    torch.manual_seed(4)
    scales = [480, 688]
    fmaps = [(torch.rand(12, 30, 40) * 3 + low), (torch.rand(12, 43, 57) * 3 + low)]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in rng.uniform((0, 0, 8, 8), (400, 300, 300, 200), (40, 4))])
    boxes[:, 2:] = np.minimum(boxes[:, 2:], [[499, 374]])
    exact = spp.pool_windows(fmaps, (375, 500), scales, boxes, ZF5, (1, 2, 3, 6))
    rows = spp.pool_windows(fmaps, (375, 500), scales, boxes, ZF5, (1, 2, 3, 6), quantized=True)
    scale, zero_point = quant.tensors_qparams(fmaps)
    assert (rows.scale, rows.zero_point) == (scale, zero_point) and (zero_point > 0) == (low < 0)
    quantized_exact = quant.quantize_values(exact, scale, zero_point)
    assert torch.equal(rows.column_order, spp.yxc_order(12, (1, 2, 3, 6)))  # pooled bin-major
    assert torch.equal(rows.values, quantized_exact[:, rows.column_order])
    assert torch.equal(rows.in_order(None).values, quantized_exact)
    assert float((rows.dequantize() - exact).abs().max()) <= scale / 2 + 1e-6
    # A uint8 map pools to the same bytes by the table (in uint8) and by roi_pool (in float32)
    quantized_map = quant.quantize_values(fmaps[1], scale, zero_point)
    assert quantized_map.dtype == torch.uint8
    cells = torch.tensor([[0, 0, 56, 42], [3, 4, 20, 9], [10, 10, 10, 10], [7, 2, 30, 40]])
    by_table = spp_pool(quantized_map, cells, (1, 2, 3, 6), method="table")
    by_roi_pool = spp_pool(quantized_map, cells, (1, 2, 3, 6), method="roi_pool")
    assert by_table.dtype == torch.uint8 and torch.equal(by_table.float(), by_roi_pool)
    assert torch.equal(by_table.float(), spp_pool_reference(quantized_map.float(), cells, (1, 2, 3, 6)))
    empty = spp.pool_windows(fmaps, (375, 500), scales, boxes[:0], ZF5, (1, 2, 3, 6), quantized=True)
    assert empty.shape == (0, exact.shape[1]) and empty.values.dtype == torch.uint8
