"""uint8 activations for the int8 fc layers (``detect.fc_compression = "int8"``, ``fccompress``): one affine
quantization per tensor, ``q = clamp(round(x / scale) + zero_point, 0, 255)``, ``x ~ (q - zero_point) * scale``,
with ``scale`` and ``zero_point`` chosen from the tensor's range as PyTorch's dynamic quantization chooses them
(the range widened to include 0, so that 0 is exact; ``reduce_range`` off).

``QuantizedRows`` carries the uint8 values with their scale and zero point. It is a plain container, not one of
PyTorch's quantized tensor types (``torch.quint8``), which PyTorch deprecates.

SPP pools fc6's input straight into uint8 (``spp.pool_windows(..., quantized=True)``). Quantization is monotonic,
so it commutes with max-pooling: pooling the quantized conv5 map gives exactly the quantized pooled features. The
map is much smaller than the pooled rows, and the rows are written one byte per value instead of four.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

UINT8_LEVELS = 255  # q in 0 .. 255


@dataclass(frozen=True)
class QuantizedRows:
    """uint8 ``values`` [N, D] standing for ``(values - zero_point) * scale``: rows of one quantization.
    ``column_order`` (int64 [D] or None): column ``j`` holds the net's column ``column_order[j]`` (SPP pools
    uint8 rows bin-major, ``spp.yxc_order``); None: the net's own order."""

    values: torch.Tensor
    scale: float
    zero_point: int
    column_order: torch.Tensor | None = None

    def __post_init__(self):
        if self.values.dtype != torch.uint8 or self.values.dim() != 2:
            raise ValueError(f"quantized rows are a uint8 [N, D] tensor, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        if self.column_order is not None and tuple(self.column_order.shape) != (self.values.shape[1],):
            raise ValueError(f"a column order of {tuple(self.column_order.shape)} for {self.values.shape[1]} columns")

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows: slice) -> "QuantizedRows":
        if not isinstance(rows, slice):
            raise TypeError("quantized rows are indexed by a slice of rows")
        return QuantizedRows(self.values[rows], self.scale, self.zero_point, self.column_order)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def in_order(self, column_order: torch.Tensor | None) -> "QuantizedRows":
        """The same rows with their columns in ``column_order`` (None: the net's order); itself when they are."""
        if _same_order(self.column_order, column_order):
            return self
        values = self.values
        if self.column_order is not None:  # back to the net's order first
            values = torch.empty_like(values)
            values[:, self.column_order.to(values.device)] = self.values
        if column_order is not None:
            values = values.index_select(1, column_order.to(values.device))
        return QuantizedRows(values, self.scale, self.zero_point, column_order)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, D], ``(values - zero_point) * scale``, in the net's column order."""
        return (self.in_order(None).values.float() - self.zero_point) * self.scale


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu())))


def choose_qparams(low: float, high: float) -> tuple[float, int]:
    """``(scale, zero_point)`` for values in ``[low, high]``: the range widened to include 0, split into 255
    steps, 0 on a step (as ``torch.quantize_per_tensor_dynamic`` chooses them, uint8, no reduced range); scale 1
    for an all-zero range."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"cannot quantize values in [{low}, {high}]: not finite")
    scale = (high - low) / UINT8_LEVELS
    if scale == 0.0:
        return 1.0, 0
    zero_point = int(min(max(round(-low / scale), 0), UINT8_LEVELS))
    return scale, zero_point


def quantize_values(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 ``clamp(round(x / scale) + zero_point, 0, 255)`` by PyTorch's quantizer in one pass (several times
    faster than the same in separate elementwise operations): a monotonic map, so ``max`` of the result is the
    result of ``max``."""
    with warnings.catch_warnings():  # PyTorch announces the quantized types' deprecation on every call
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8).int_repr()


def tensors_qparams(tensors: Sequence[torch.Tensor]) -> tuple[float, int]:
    """``choose_qparams`` over the values of all ``tensors`` (e.g. one image's conv5 maps at every scale)."""
    ranges = [torch.aminmax(t.detach()) for t in tensors if t.numel()]
    if not ranges:
        return choose_qparams(0.0, 0.0)
    return choose_qparams(min(float(low) for low, _ in ranges), max(float(high) for _, high in ranges))


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """Float rows [N, D] quantized with the scale their own range gives (dynamic quantization, per tensor)."""
    scale, zero_point = tensors_qparams([x])
    return QuantizedRows(quantize_values(x, scale, zero_point), scale, zero_point)
