"""Window -> conv5 mapping, scale choice and spatial pyramid pooling (SPEC.md §1-2).

Coordinate conventions, each function owning one step of SPEC §2:

- ``choose_scale``: our boxes (float ``[x1, y1, x2, y2)``, 0-based) -> index of the scale to pool from.
- ``scale_boxes``: our boxes -> the SPEC's ``b'``: **1-based inclusive** coordinates in the resized image
  (``b' = (b - 1)(s - 1)/(min(H, W) - 1) + 1`` applied to the 1-based inclusive box ``x1 + 1 .. x2``).
- ``boxes_to_cells``: exactly what ``scale_boxes`` returns -> **0-based inclusive** conv5 cells ``(x0, y0, x1, y1)``.
- ``spp_pool``: conv5 map + cells -> the pooled vector, levels in pyramid order, each flattened ``(C, y, x)``.

Pooling bins [P App. A; S mex]: for a window ``w`` cells wide and an ``n x n`` level, bin ``i`` covers cells
``[floor(i*w/n), ceil((i+1)*w/n))`` from the window's left cell (same for y); the value is the max over the bin.
Unlike the mex (which zero-initialises its max), the max here is the true max: identical for post-ReLU maps
(ZF-5, AlexNet, VGG-16), and correct for MobileNetV2's linear-bottleneck output, which can be negative.

Implementations, all exact and tested against each other: ``spp_pool`` (a sparse-table range max for the
finest level, coarser levels derived from it; or ``method="roi_pool"``), ``spp_pool_naive_per_level`` (one
torchvision roi_pool per level: the benchmark baseline) and ``spp_pool_reference`` (a plain loop, for tests).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import quant
from .quant import QuantizedRows

if TYPE_CHECKING:  # nets.py imports this module; the spec is only read through its attributes here
    from .nets import BackboneSpec

DEFAULT_PYRAMID = (1, 2, 3, 6)  # 50 bins [P §4.1]
# The released code's scale choice targets a scaled box side of 13 cells x 16 px = 208 px [S:spm_expected_scale.m].
TARGET_SIDE = 13 * 16
# The paper's rule: the scale at which the window's area is closest to 224 x 224 pixels [P §4.1].
TARGET_AREA = 224 * 224
# Bytes of one corner block gathered by the sparse-table pooling (its four corners are gathered at once): small
# temporaries the allocator reuses; a uint8 map's chunks hold four times the windows of a float32 one's.
_GATHER_BYTES = 4 << 20
_GATHER_BYTES_GPU = 32 << 20  # on a GPU fewer, larger launches win; the caching allocator reuses the memory


def spp_dim(channels: int, pyramid: Sequence[int] = DEFAULT_PYRAMID) -> int:
    """Length of the pooled vector: ``channels * sum(n^2)`` (256 * 50 = 12800 for ZF-5)."""
    return int(channels) * sum(int(n) * int(n) for n in pyramid)


def _as_boxes(boxes) -> np.ndarray:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def choose_scale(boxes, image_hw: tuple[int, int], scales: Sequence[int], rule: str = "code") -> np.ndarray:
    """Index into ``scales`` of the scale each box is pooled from (SPEC §2 step 1); int64 [N].

    ``rule="code"``: ``e = round(208 * min(H, W) / sqrt(w * h))`` with MATLAB's half-up rounding, then the scale
    nearest to ``e`` (first on ties). Our ``w = x2 - x1`` equals the 1-based inclusive ``x2 - x1 + 1``.
    ``rule="paper"``: the scale at which the resized window's area is nearest to 224 x 224 (first on ties).
    Widths and heights are floored at one pixel (the smallest 1-based inclusive box), so a degenerate box
    still gets a finite choice.
    """
    boxes = _as_boxes(boxes)
    scales_arr = np.asarray(list(scales), dtype=np.float64)
    if scales_arr.size == 0:
        raise ValueError("choose_scale needs at least one scale")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    short = float(min(image_hw))
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    if rule == "code":
        expected = np.floor(TARGET_SIDE * short / np.sqrt(widths * heights) + 0.5)  # not np.round: half-to-even
        distance = np.abs(scales_arr[None, :] - expected[:, None])
    elif rule == "paper":
        areas = (widths * heights)[:, None] * (scales_arr[None, :] / short) ** 2
        distance = np.abs(areas - TARGET_AREA)
    else:
        raise ValueError(f"unknown scale rule {rule!r} (known: code, paper)")
    return np.argmin(distance, axis=1).astype(np.int64)  # argmin returns the first minimum: first on ties


def scale_boxes(boxes, image_hw: tuple[int, int], short_side: int) -> np.ndarray:
    """Our boxes -> the SPEC's ``b'`` in the image resized to ``short_side``: float64 [N,4], **1-based inclusive**.

    The box becomes 1-based inclusive (``x1 + 1, y1 + 1, x2, y2``; VOC's xmin..xmax), then
    ``b' = (b - 1)(s - 1)/(min(H, W) - 1) + 1`` (SPEC §2 step 2). ``boxes_to_cells`` consumes this directly.
    """
    boxes = _as_boxes(boxes)
    short = min(int(image_hw[0]), int(image_hw[1]))
    if short < 2:
        raise ValueError(f"image {tuple(image_hw)} is too small to rescale boxes (shorter side < 2)")
    one_based = boxes + np.array([1.0, 1.0, 0.0, 0.0])
    return (one_based - 1.0) * ((int(short_side) - 1) / (short - 1)) + 1.0


def boxes_to_cells(scaled_boxes, fmap_hw: tuple[int, int], spec: BackboneSpec) -> np.ndarray:
    """``scale_boxes`` output -> conv5 cells ``(x0, y0, x1, y1)``, 0-based inclusive, int64 [N,4] (SPEC §2 steps 3-4).

    ``X0 = floor((x1' - offset0 + offset)/stride + 0.5) + 1``, ``X1 = ceil((x2' - offset0 - offset)/stride - 0.5) + 1``
    (1-based cells); if ``X0 > X1`` both become ``(X0 + X1)/2`` with C's truncating division; **then** each is
    clamped to ``[1, W_fm]`` (``[1, H_fm]`` for y). Returned minus one.
    """
    b = _as_boxes(scaled_boxes)
    height, width = int(fmap_hw[0]), int(fmap_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"empty feature map {tuple(fmap_hw)}")
    stride, offset0, offset = float(spec.stride), float(spec.offset0), float(spec.offset)
    start = np.floor((b[:, 0:2] - offset0 + offset) / stride + 0.5) + 1  # (X0, Y0)
    end = np.ceil((b[:, 2:4] - offset0 - offset) / stride - 0.5) + 1  # (X1, Y1)
    start, end = start.astype(np.int64), end.astype(np.int64)
    degenerate = start > end
    middle = np.trunc((start + end) / 2.0).astype(np.int64)  # C integer division truncates toward zero
    start = np.where(degenerate, middle, start)
    end = np.where(degenerate, middle, end)
    upper = np.array([width, height], dtype=np.int64)
    start = np.clip(start, 1, upper)
    end = np.clip(end, 1, upper)
    return np.concatenate([start, end], axis=1) - 1


# ------------------------------------------------------------------------------------------------ pooling


def distinct_cells(scale_index, cells) -> tuple[np.ndarray, np.ndarray]:
    """Windows on the same (scale index, conv5 cell rectangle) pool identical features. Returns ``(rows,
    inverse)``: ``rows`` picks the first window of each distinct key, in ascending key order (scale first, so each
    scale's picks are contiguous), and ``inverse`` maps every window to its key's position in ``rows``
    (``per_window = per_distinct[inverse]``). The released code's ``dedup`` [S:spp_features_convX_to_poolX.m]."""
    keys = np.column_stack([np.asarray(scale_index, dtype=np.int64).reshape(-1),
                            np.asarray(cells, dtype=np.int64).reshape(-1, 4)])
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, rows, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return rows.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _bin_edges(extent: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact integer bins of an ``n``-level over windows ``extent`` cells long: (start [M,n], end [M,n]), end exclusive."""
    i = np.arange(n, dtype=np.int64)
    extent = extent.astype(np.int64)[:, None]
    return (i * extent) // n, -((-(i + 1) * extent) // n)


def _roi_pool_is_exact(extent: np.ndarray, n: int, dtype: torch.dtype) -> np.ndarray:
    """Per window: does torchvision's roi_pool reproduce the exact bins of an ``n``-level for this extent?

    roi_pool computes ``bin = T(extent) / T(n)`` then ``floor(T(i) * bin)`` and ``ceil(T(i + 1) * bin)`` in the
    map's float type T (its CPU and CUDA kernels alike, IEEE arithmetic). Division first can round past an
    integer: with float32 and n = 7, extent 57 gives ``ceil(7 * fl(57/7)) = 58``. This replays that arithmetic
    in numpy. For n in {1, 2, 3, 4, 5, 6} every extent up to 5000 is exact; 7, 11, 13, ... are not.
    """
    ftype = np.float32 if dtype == torch.float32 else np.float64
    i = np.arange(n, dtype=ftype)
    bin_size = extent.astype(ftype)[:, None] / ftype(n)
    start = np.floor(i * bin_size).astype(np.int64)
    end = np.ceil((i + ftype(1)) * bin_size).astype(np.int64)
    exact_start, exact_end = _bin_edges(extent, n)
    return np.all((start == exact_start) & (end == exact_end), axis=1)


def _check_cells(fmap: torch.Tensor, cells) -> torch.Tensor:
    """Cells as a CPU int64 [N,4] tensor (bins are computed on the host); out-of-map or inverted cells are a bug."""
    if fmap.dim() != 3:
        raise ValueError(f"expected a feature map [C,h,w], got shape {tuple(fmap.shape)}")
    if isinstance(cells, torch.Tensor):
        cells = cells.detach().cpu()
    cells = torch.as_tensor(np.asarray(cells), dtype=torch.int64).reshape(-1, 4)
    _, height, width = fmap.shape
    x0, y0, x1, y1 = cells.unbind(1)
    if len(cells) and not bool(((x0 >= 0) & (y0 >= 0) & (x0 <= x1) & (y0 <= y1) & (x1 < width)
                                & (y1 < height)).all()):
        raise ValueError(f"cells outside the {height}x{width} map or with x0 > x1 / y0 > y1")
    return cells


def _compute_dtype(fmap: torch.Tensor) -> torch.dtype:
    # roi_pool supports float32/float64 only, and its bin arithmetic runs in the map's type: never half.
    return torch.float64 if fmap.dtype == torch.float64 else torch.float32


def _roi_pool_level(fmap: torch.Tensor, cells: torch.Tensor, n: int) -> torch.Tensor:
    """roi_pool of one level: integer cells -> [N, C, n, n]. ``round(x * 1.0)`` keeps them, and
    ``roi_end - roi_start + 1`` is the inclusive cell count, the ``w`` of the bin formula."""
    rois = torch.cat([torch.zeros(len(cells), 1, dtype=fmap.dtype, device=fmap.device),
                      cells.to(device=fmap.device, dtype=fmap.dtype)], dim=1)
    if torch.is_grad_enabled() and fmap.requires_grad:
        from torchvision.ops import roi_pool  # its backward is registered by torchvision's Python package

        return roi_pool(fmap[None], rois, output_size=(n, n), spatial_scale=1.0)
    from .vision_ops import op  # the same kernel without torchvision's 2-3 s import

    return op("roi_pool")(fmap[None], rois, 1.0, n, n)[0]


def _floor_log2(values: np.ndarray) -> np.ndarray:
    """Exact ``floor(log2(v))`` of positive integers (frexp: v = m * 2^e with m in [0.5, 1))."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64) - 1


def _window_bins(cells_np: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Absolute bin bounds of an ``n``-level for each window: (xs, xe, ys, ye), each [N, n], ends exclusive."""
    xs, xe = _bin_edges(cells_np[:, 2] - cells_np[:, 0] + 1, n)
    ys, ye = _bin_edges(cells_np[:, 3] - cells_np[:, 1] + 1, n)
    return xs + cells_np[:, :1], xe + cells_np[:, :1], ys + cells_np[:, 1:2], ye + cells_np[:, 1:2]


class _RangeMaxTable:
    """2-D sparse table of one map for exact rectangle maxima: ``T[a, b][y, x]`` = max over rows
    ``y .. y + 2^a - 1`` and columns ``x .. x + 2^b - 1``, channels last, all (a, b) tables in one [rows, C] tensor.

    A bin of ``L_y x L_x`` cells is the union of the four (overlapping) ``2^a x 2^b`` blocks at its corners
    (``a = floor(log2 L_y)``, ``b = floor(log2 L_x)``), so any bin costs four C-vector gathers, however large.
    Building costs ``(max_a + 1)(max_b + 1)`` elementwise maxima of the map.
    """

    def __init__(self, fmap: torch.Tensor, max_a: int, max_b: int):
        self.channels = channels = fmap.shape[0]
        height, width = fmap.shape[1:]
        if max_a >= height.bit_length() or max_b >= width.bit_length():
            raise ValueError(f"a {1 << max_a}x{1 << max_b} block does not fit a {height}x{width} map")
        rows_of = [height - (1 << a) + 1 for a in range(max_a + 1)]  # T[a, .] has these rows
        self.row_widths = np.array([width - (1 << b) + 1 for b in range(max_b + 1)], np.int64)  # columns of T[., b]
        sizes = np.outer(rows_of, self.row_widths)
        self.offsets = (np.cumsum(sizes.reshape(-1)) - sizes.reshape(-1)).reshape(sizes.shape)  # first row of T[a, b]
        # Every table written in place into one [rows, C] tensor (no concatenation copy), unless gradients flow.
        in_place = not (torch.is_grad_enabled() and fmap.requires_grad)
        self.flat = fmap.new_empty((int(sizes.sum()), channels)) if in_place else None
        tables = []

        def table(a: int, b: int, value: torch.Tensor | None = None, first=None, second=None) -> torch.Tensor:
            """T[a, b] [rows, cols, C]: ``value``, or ``maximum(first, second)``, written into ``flat``."""
            if not in_place:
                block = value if value is not None else torch.maximum(first, second)
                tables.append(block.reshape(-1, channels))
                return block
            start = int(self.offsets[a, b])
            block = self.flat[start:start + int(sizes[a, b])].view(rows_of[a], int(self.row_widths[b]), channels)
            if value is not None:
                block.copy_(value)
            else:
                torch.maximum(first, second, out=block)
            return block

        rows_max = table(0, 0, value=fmap.permute(1, 2, 0))  # [H, W, C]
        for a in range(max_a + 1):
            if a:
                step = 1 << (a - 1)
                rows_max = table(a, 0, first=rows_max[:-step], second=rows_max[step:])
            block = rows_max
            for b in range(1, max_b + 1):
                step = 1 << (b - 1)
                block = table(a, b, first=block[:, :-step], second=block[:, step:])
        if not in_place:
            self.flat = torch.cat(tables)

    def pool(self, bins: tuple[np.ndarray, ...]) -> torch.Tensor:
        """Max over each bin of one level: ``bins`` from ``_window_bins`` -> [M, C, n, n] (channels-last strides)."""
        xs, xe, ys, ye = bins
        count, n = xs.shape
        a = _floor_log2(ye - ys)  # [M, n] per y-bin
        b = _floor_log2(xe - xs)  # [M, n] per x-bin
        base = self.offsets[a[:, :, None], b[:, None, :]]  # [M, n_y, n_x]: y along axis 1, x along axis 2
        width_b = self.row_widths[b][:, None, :]
        corner_rows = (ys[:, :, None], (ye - (1 << a))[:, :, None])  # top and bottom block rows
        corner_cols = (xs[:, None, :], (xe - (1 << b))[:, None, :])  # left and right block columns
        corners = np.stack([base + y * width_b + x for y in corner_rows for x in corner_cols])  # [4, M, n, n]
        index = torch.from_numpy(corners.reshape(-1)).to(self.flat.device)
        if torch.is_grad_enabled() and self.flat.requires_grad:  # maxima split a tie's gradient as before
            blocks = self.flat.index_select(0, index).view(4, -1, self.channels).unbind(0)
            result = torch.maximum(torch.maximum(torch.maximum(blocks[0], blocks[1]), blocks[2]), blocks[3])
        else:  # one gather and one reduction: 20% less than four gathers and three maxima
            result = self.flat.index_select(0, index).view(4, -1, self.channels).amax(0)
        return result.view(count, n, n, self.channels).permute(0, 3, 1, 2)


def _table_extent(cells_np: np.ndarray, levels: Sequence[int]) -> tuple[int, int]:
    """(max_a, max_b) of the smallest table that serves every bin of ``levels`` for these windows."""
    max_a = max_b = 0
    for n in levels:
        xs, xe, ys, ye = _window_bins(cells_np, n)
        max_a = max(max_a, int(_floor_log2(ye - ys).max()))
        max_b = max(max_b, int(_floor_log2(xe - xs).max()))
    return max_a, max_b


def _table_for(fmap: torch.Tensor, cells_np: np.ndarray, levels: Sequence[int]) -> _RangeMaxTable:
    """The smallest table that serves every bin of ``levels`` for these windows."""
    return _RangeMaxTable(fmap, *_table_extent(cells_np, levels))


# Relative cost of one cell x channel in each pooling method (CPU, float32, 320-1280 channels): roi_pool's kernel
# visits every cell of every bin one by one; the table pays a fixed build, (max_a + 1)(max_b + 1) maps, per image.
_ROI_POOL_COST_PER_CELL = 1.0
_TABLE_COST_PER_CELL = 2.5


def pooling_method(fmap_hw: tuple[int, int], cells_np: np.ndarray, levels: Sequence[int],
                   extent: tuple[int, int] | None = None) -> str:
    """"table" or "roi_pool", by expected cost: roi_pool reads every window's cells once per pooled level, the
    table builds (max_a + 1)(max_b + 1) copies of the map once and then costs four gathers per bin. Few windows on
    a map (fine-tuning's draws: tens per image) -> roi_pool; thousands (every proposal of an image) -> table.
    ``extent``: ``_table_extent(cells_np, levels)`` when the caller already has it."""
    if len(cells_np) == 0:
        return "table"
    areas = (cells_np[:, 2] - cells_np[:, 0] + 1) * (cells_np[:, 3] - cells_np[:, 1] + 1)
    roi_cost = _ROI_POOL_COST_PER_CELL * float(areas.sum()) * len(levels)
    max_a, max_b = extent if extent is not None else _table_extent(cells_np, levels)
    table_cost = _TABLE_COST_PER_CELL * (max_a + 1) * (max_b + 1) * int(fmap_hw[0]) * int(fmap_hw[1])
    return "roi_pool" if roi_cost < table_cost else "table"


def _roi_pool_or_table(fmap: torch.Tensor, cells: torch.Tensor, n: int) -> torch.Tensor:
    """roi_pool of one level wherever its float bin arithmetic is exact; the sparse table for the other windows."""
    cells_np = cells.cpu().numpy()
    exact = (_roi_pool_is_exact(cells_np[:, 2] - cells_np[:, 0] + 1, n, fmap.dtype)
             & _roi_pool_is_exact(cells_np[:, 3] - cells_np[:, 1] + 1, n, fmap.dtype))
    if exact.all():
        return _roi_pool_level(fmap, cells, n)
    level = fmap.new_empty((len(cells), fmap.shape[0], n, n))
    exact_t = torch.from_numpy(exact).to(fmap.device)
    if exact.any():
        level[exact_t] = _roi_pool_level(fmap, cells[exact], n)
    inexact = cells_np[~exact]
    level[~exact_t] = _table_for(fmap, inexact, [n]).pool(_window_bins(inexact, n))
    return level


def _max_pool_level(finer: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k x k``, stride ``k`` max-pool of a pooled level [M, C, m, m] (``k`` divides ``m``), exactly. Without
    gradients, the maximum of its ``k^2`` strided sub-grids: about a third of max_pool2d's time on roi_pool's
    [M, C, m, m] output, whose tiny planes max_pool2d walks one by one, and no slower on the table's channels-last
    levels. With gradients, max_pool2d as before (it sends a tie's gradient to one cell, maxima split it)."""
    if torch.is_grad_enabled() and finer.requires_grad:
        return F.max_pool2d(finer, kernel_size=k, stride=k)
    pooled = None
    for dy in range(k):
        for dx in range(k):
            part = finer[:, :, dy::k, dx::k]
            pooled = part if pooled is None else torch.maximum(pooled, part)
    return pooled


LAYOUTS = ("cyx", "yxc")  # the order of a level's values in a pooled row: channel-major (the net's) or bin-major


def _write_levels(dest: torch.Tensor, levels: dict[int, torch.Tensor], pyramid: tuple[int, ...],
                  layout: str = "cyx") -> None:
    """Complete ``levels`` with the derived ones (max-pool of a pooled multiple, see ``spp_pool``), then copy each
    into its slice of ``dest`` [M, D], in pyramid order, flattened ``(C, y, x)`` (``layout`` "cyx") or
    ``(y, x, C)`` ("yxc": the levels' own channels-last order, so the copy moves whole channel vectors)."""
    for n in sorted(set(pyramid), reverse=True):
        if n not in levels:
            m = min(m for m in levels if m % n == 0)  # the smallest pooled multiple: the fewest cells to reduce
            levels[n] = _max_pool_level(levels[m], m // n)
    column = 0
    for n in pyramid:
        channels = levels[n].shape[1]
        part = dest[:, column:column + channels * n * n]
        if layout == "yxc":
            part.view(len(dest), n, n, channels).permute(0, 3, 1, 2).copy_(levels[n])
        else:
            part.view(len(dest), channels, n, n).copy_(levels[n])
        column += channels * n * n


def yxc_order(channels: int, pyramid: Sequence[int] = DEFAULT_PYRAMID) -> torch.Tensor:
    """int64 [D]: for each column of a "yxc" pooled row, the column of the "cyx" row (the net's) it holds, so that
    ``cyx_rows[:, yxc_order(...)]`` is the "yxc" row and ``weight[:, yxc_order(...)]`` the fc6 weights for it."""
    parts, column = [], 0
    for n in (int(n) for n in pyramid):
        cyx = torch.arange(channels * n * n).view(channels, n, n)
        parts.append(column + cyx.permute(1, 2, 0).reshape(-1))
        column += channels * n * n
    return torch.cat(parts)


def spp_pool(fmap: torch.Tensor, cells, pyramid: Sequence[int] = DEFAULT_PYRAMID,
             method: str = "auto", out: torch.Tensor | None = None, layout: str = "cyx") -> torch.Tensor:
    """Spatial pyramid pooling of N windows of one map: ``fmap`` [C,h,w], ``cells`` int64 [N,4] 0-based inclusive
    ``(x0, y0, x1, y1)`` -> [N, C * sum(n^2)], levels in ``pyramid`` order, each flattened ``(C, y, x)``.

    Only levels that divide no other level are pooled from the map; an ``n``-level whose ``n`` divides a pooled
    ``m``-level is the ``k x k`` (``k = m/n``) max-pool of it, exactly, because bin ``i`` of the ``n``-level,
    ``[floor(i w/n), ceil((i+1) w/n))``, is the union of the ``m``-level bins ``ik .. ik+k-1`` (the first starts
    at ``floor(ik w/m)``, the last ends at ``ceil((i+1)k w/m)``, consecutive bins touch or overlap). For
    {1, 2, 3, 6} that is the 6x6 level plus three tiny max-pools.

    ``method``: "table": ``_RangeMaxTable``, exact for any level, windows in chunks written straight into the
    output. "roi_pool": torchvision's roi_pool per pooled level (the table for the windows where its float bins
    are inexact). Both are exact and differentiable with respect to ``fmap``. "auto" (default): whichever
    ``pooling_method`` expects to be cheaper for these windows (same values either way).

    ``out``: a [N, D] tensor (e.g. rows of a larger one) to write into instead of a new one, each level converted
    to its type as it is written (no separate copy or conversion pass); returned.

    ``layout`` "yxc": each level flattened ``(y, x, C)`` instead (``yxc_order`` maps it to the net's order), as the
    int8 head takes it (``fccompress.Int8SppHead``): the table's channel vectors are then copied whole, not
    transposed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pooled layout {layout!r} (known: {', '.join(LAYOUTS)})")
    pyramid = tuple(int(n) for n in pyramid)
    cells = _check_cells(fmap, cells)
    # A uint8 map (quantized, ``pool_windows(quantized=True)``) is pooled in uint8 by the table: maxima of small
    # integers need no float, and a byte per value is a quarter of the memory traffic. roi_pool takes floats only.
    table_uint8 = fmap.dtype == torch.uint8 and method in ("auto", "table")
    fmap = fmap if table_uint8 else fmap.to(_compute_dtype(fmap))
    channels = fmap.shape[0]
    if out is None:
        out = fmap.new_empty((len(cells), spp_dim(channels, pyramid)))
    elif tuple(out.shape) != (len(cells), spp_dim(channels, pyramid)):
        raise ValueError(f"out has shape {tuple(out.shape)}, not {(len(cells), spp_dim(channels, pyramid))}")
    if len(cells) == 0:
        return out
    distinct = sorted(set(pyramid), reverse=True)
    roots = [n for n in distinct if not any(m != n and m % n == 0 for m in distinct)]
    if method in ("auto", "table"):  # the table's extent, computed once for the choice and the build
        cells_np = cells.numpy()
        extent = _table_extent(cells_np, roots)
    if method == "auto":
        method = pooling_method(fmap.shape[1:], cells_np, roots, extent)
    if method == "roi_pool" and fmap.dtype == torch.uint8:
        fmap = fmap.to(torch.float32)  # exact: small integers
    if method == "table":
        table = _RangeMaxTable(fmap, *extent)
        # Chunks keep each corner block near _GATHER_BYTES (small temporaries the allocator reuses).
        budget = (_GATHER_BYTES if fmap.device.type == "cpu" else _GATHER_BYTES_GPU) // fmap.element_size()
        chunk = max(1, budget // (channels * sum(n * n for n in roots)))
        for lo in range(0, len(cells_np), chunk):
            part = cells_np[lo:lo + chunk]
            _write_levels(out[lo:lo + chunk], {n: table.pool(_window_bins(part, n)) for n in roots}, pyramid,
                          layout)
    elif method == "roi_pool":
        _write_levels(out, {n: _roi_pool_or_table(fmap, cells, n) for n in roots}, pyramid, layout)
    else:
        raise ValueError(f"unknown spp_pool method {method!r} (known: auto, table, roi_pool)")
    return out


def spp_pool_naive_per_level(fmap: torch.Tensor, cells, pyramid: Sequence[int] = DEFAULT_PYRAMID) -> torch.Tensor:
    """The plain baseline for benchmarks: one torchvision roi_pool per level, nothing else (exact for n <= 6)."""
    cells = _check_cells(fmap, cells)
    fmap = fmap.to(_compute_dtype(fmap))
    if len(cells) == 0:
        return fmap.new_zeros((0, spp_dim(fmap.shape[0], pyramid)))
    return torch.cat([_roi_pool_level(fmap, cells, int(n)).flatten(1) for n in pyramid], dim=1)


def spp_pool_reference(fmap: torch.Tensor, cells, pyramid: Sequence[int] = DEFAULT_PYRAMID) -> torch.Tensor:
    """Slow loop straight from the bin formula (for tests): window by window, bin by bin."""
    cells = _check_cells(fmap, cells)
    fmap = fmap.to(_compute_dtype(fmap))
    rows = []
    for x0, y0, x1, y1 in cells.tolist():
        w, h = x1 - x0 + 1, y1 - y0 + 1
        parts = []
        for n in pyramid:
            level = fmap.new_empty((fmap.shape[0], n, n))
            for j in range(n):  # y bins
                ys, ye = y0 + (j * h) // n, y0 + -((-(j + 1) * h) // n)  # integer floor / ceil, never float
                for i in range(n):  # x bins
                    xs, xe = x0 + (i * w) // n, x0 + -((-(i + 1) * w) // n)
                    level[:, j, i] = fmap[:, ys:ye, xs:xe].amax(dim=(1, 2))
            parts.append(level.flatten())
        rows.append(torch.cat(parts))
    if not rows:
        return fmap.new_zeros((0, spp_dim(fmap.shape[0], pyramid)))
    return torch.stack(rows)


def spp_pool_full(fmaps: torch.Tensor, pyramid: Sequence[int] = DEFAULT_PYRAMID) -> torch.Tensor:
    """Fixed-size SPP over whole maps (classification): [B,C,h,w] -> [B, C * sum(n^2)], same bins and layout as
    ``spp_pool`` with the window = the whole map. ``adaptive_max_pool2d`` uses exactly these bins
    (``floor(i*w/n)`` .. ``ceil((i+1)*w/n)`` in integer arithmetic); the prototxt's fixed k7 s7 for the 2x2
    level at 13x13 (SPEC §1) is the one place the released classifier differs."""
    if fmaps.dim() != 4:
        raise ValueError(f"expected feature maps [B,C,h,w], got shape {tuple(fmaps.shape)}")
    if fmaps.dtype not in (torch.float32, torch.float64):
        fmaps = fmaps.float()
    return torch.cat([F.adaptive_max_pool2d(fmaps, int(n)).flatten(1) for n in pyramid], dim=1)


def pool_windows(fmaps: Sequence[torch.Tensor], image_hw: tuple[int, int], scales: Sequence[int], boxes,
                 spec: BackboneSpec, pyramid: Sequence[int] = DEFAULT_PYRAMID,
                 scale_index: np.ndarray | None = None, rule: str = "code",
                 quantized: bool = False) -> torch.Tensor | QuantizedRows:
    """Pooled features of ``boxes`` (our convention, original-image coordinates) from one image's multi-scale
    conv5 maps (``fmaps[k]`` computed at shorter side ``scales[k]``) -> float32 [N, D], in input order.

    Each box is pooled from one scale: ``scale_index`` (int [N], into ``scales``) or, when None, the best scale
    by ``choose_scale(rule)``. Then ``scale_boxes`` -> ``boxes_to_cells`` -> ``spp_pool`` per scale. A scale
    whose boxes are consecutive rows (boxes sorted by scale, as ``distinct_cells`` orders them, or one scale) is
    pooled straight into its rows of the result, unless gradients flow through the maps.

    ``quantized``: the rows as uint8 ``QuantizedRows`` instead (int8 fc6's input, ``fccompress``; inference only),
    with one scale and zero point from the range of all the maps: each map is quantized once and pooled in uint8,
    exactly the quantized float rows (quantization is monotonic; ``core/quant.py``), each level bin-major ("yxc",
    their ``column_order``).
    """
    scales = [int(s) for s in scales]
    if len(fmaps) != len(scales) or not scales:
        raise ValueError(f"{len(fmaps)} feature maps for {len(scales)} scales")
    boxes = _as_boxes(boxes)
    channels = fmaps[0].shape[0]
    device = fmaps[0].device
    layout = "yxc" if quantized else "cyx"
    if quantized:
        scale, zero_point = quant.tensors_qparams(fmaps)
        fmaps = [quant.quantize_values(fmap, scale, zero_point) for fmap in fmaps]  # uint8, pooled in uint8
    # Every row is written below (each box has exactly one scale): no zero fill needed.
    out = torch.empty((len(boxes), spp_dim(channels, pyramid)), dtype=torch.uint8 if quantized else torch.float32,
                      device=device)
    result = quant.QuantizedRows(out, scale, zero_point, yxc_order(channels, pyramid)) if quantized else out
    if len(boxes) == 0:
        return result
    if scale_index is None:
        scale_index = choose_scale(boxes, image_hw, scales, rule)
    scale_index = np.asarray(scale_index, dtype=np.int64).reshape(-1)
    if len(scale_index) != len(boxes):
        raise ValueError(f"{len(scale_index)} scale indices for {len(boxes)} boxes")
    if scale_index.min() < 0 or scale_index.max() >= len(scales):
        raise ValueError(f"scale index outside 0..{len(scales) - 1}")
    for k, short_side in enumerate(scales):
        chosen = np.flatnonzero(scale_index == k)
        if len(chosen) == 0:
            continue
        fmap = fmaps[k]
        cells = torch.from_numpy(boxes_to_cells(scale_boxes(boxes[chosen], image_hw, short_side), fmap.shape[-2:],
                                                spec))
        consecutive = int(chosen[-1]) - int(chosen[0]) + 1 == len(chosen)
        if consecutive and not (torch.is_grad_enabled() and fmap.requires_grad):
            # Pooled in place: no temporary, no scatter copy (training keeps the plain autograd path).
            spp_pool(fmap, cells, pyramid, out=out[int(chosen[0]):int(chosen[-1]) + 1], layout=layout)
        else:
            out[torch.from_numpy(chosen).to(device)] = spp_pool(fmap, cells, pyramid, layout=layout).to(out.dtype)
    return result
