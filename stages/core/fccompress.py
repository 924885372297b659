"""Less fc work at test time (``detect.fc_compression``): fc6/fc7 of a trained ``SppHead`` replaced by

- **svd**: Fast R-CNN's truncated SVD (§3.1, SPEC §10), no retraining: ``W ~ U_t S_t V_t^T`` keeps the top ``t``
  singular values, and the layer becomes two: ``S_t V_t^T`` without bias (``in -> t``), then ``U_t`` with the
  original bias (``t -> out``), ``t (in + out)`` multiply-adds per window instead of ``in x out``;
- **int8**: int8 weights per output channel, uint8 input per tensor, int32 accumulation. CPU only. Where the CPU
  has AMX tiles (``int8_engine()`` is "onednn"), ``Int8SppHead``: each layer one oneDNN call that also applies the
  scales, the bias and the ReLU (``Int8LinearReLU``), and fc6 takes the uint8 rows SPP pools straight from the
  quantized conv5 map (``spp.pool_windows(..., quantized=True)``, ``core/quant.py``), so the pooled features are
  never written or read in float32. Elsewhere PyTorch's dynamic int8 linear layers (``quantize_dynamic``, each
  batch's input quantized on the fly) for its default engine (fbgemm/x86, VNNI where the CPU has it).

fc8 is left as it is (it is small, and softmax scores read it). ``compress_head`` returns a compressed copy (the
head it is given is untouched) with the head's interface (``features``, ``forward``, ``in_features``,
``input_dtype``), so feature, scoring and bench code take it like any head. For inference only: a compressed head
is never trained or saved.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

from . import quant, spp
from .config import CHOICES
from .errors import SppError
from .nets import SppHead

FC_COMPRESSIONS = CHOICES["detect.fc_compression"]  # ("none", "svd", "int8")
COMPRESSED_LAYERS = ("fc6", "fc7")  # fc8 stays: small, and softmax scores read it
COMPRESSION_KEYS = ("fc_compression", "fc_svd_ranks")  # of the detect section


class LowRankLinear(nn.Module):
    """A linear layer as the product of two: ``reduce`` (``in -> rank``, no bias) then ``expand``
    (``rank -> out``, the original bias)."""

    def __init__(self, reduce: nn.Linear, expand: nn.Linear):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    @property
    def in_features(self) -> int:
        return self.reduce.in_features

    @property
    def out_features(self) -> int:
        return self.expand.out_features

    @property
    def rank(self) -> int:
        return self.reduce.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reduce, expand)`` with ``expand @ reduce`` the best rank-``rank`` approximation of ``weight`` [out, in]
    (its truncated SVD), in float64: ``S_t V_t^T`` and ``U_t`` when ``out <= in`` (Fast R-CNN's split), else
    ``V_t^T`` and ``U_t S_t``.

    The top singular vectors come from the eigen-decomposition of the smaller Gram matrix (``W W^T`` when
    ``out <= in``): ``U_t`` are its top eigenvectors and ``S_t V_t^T = U_t^T W``, so nothing is divided by a small
    singular value, and ``U_t U_t^T W`` is the truncated SVD reconstruction (several times faster than a full SVD
    on a CPU: 0.3 s against 2.3 s for a 1024 x 4480 layer on one thread)."""
    weight = weight.detach().to("cpu", torch.float64)
    out_dim, in_dim = weight.shape
    if out_dim <= in_dim:  # left singular vectors: W = U (S V^T)
        _, vectors = torch.linalg.eigh(weight @ weight.T)  # ascending eigenvalues
        top = vectors[:, -rank:].flip(1)  # U_t, largest first
        return top.T @ weight, top
    _, vectors = torch.linalg.eigh(weight.T @ weight)  # right singular vectors: W = (U S) V^T
    top = vectors[:, -rank:].flip(1)  # V_t
    return top.T, weight @ top


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Module:
    """``layer`` at its top ``rank`` singular values (a ``LowRankLinear``; ``low_rank_factors``, stored in the
    layer's type on its device), or a copy of it as it is when ``rank >= min(in, out)`` (nothing to drop)."""
    out_dim, in_dim = layer.weight.shape
    if rank < 1:
        raise SppError(f"a truncated SVD needs a positive rank, got {rank}")
    if rank >= min(in_dim, out_dim):
        return copy.deepcopy(layer)
    reduce_weight, expand_weight = low_rank_factors(layer.weight, rank)
    like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    reduce = nn.Linear(in_dim, rank, bias=False, **like)
    expand = nn.Linear(rank, out_dim, bias=layer.bias is not None, **like)
    with torch.no_grad():
        reduce.weight.copy_(reduce_weight)
        expand.weight.copy_(expand_weight)
        if layer.bias is not None:
            expand.bias.copy_(layer.bias)
    return LowRankLinear(reduce, expand)


def int8_engine() -> str:
    """Which int8 fc layers ``compress_head`` makes: "onednn" where the CPU has AMX tiles (``Int8SppHead``: its
    int8 GEMMs run on them, 2.5x the x86/fbgemm engine's rate at fc6's shape on a 2-core AMX machine,
    docs/BENCHMARKS.md), else PyTorch's default quantized engine (``torch.backends.quantized.engine``) for its
    dynamic int8 layers (``quantize_int8``). Both have per-channel int8 weights and uint8 input; the first takes
    fc6's input as SPP pools it (one scale per image's maps), the second quantizes each batch."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if "onednn" in torch.backends.quantized.supported_engines and has_amx is not None and has_amx():
        return "onednn"
    return torch.backends.quantized.engine


@contextlib.contextmanager
def _quantized_engine(engine: str):
    """``torch.backends.quantized.engine`` set to ``engine`` inside, restored after: a packed layer keeps the
    engine it was packed for, so nothing else in the process changes."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved


def quantize_int8(head: SppHead, layers: Sequence[str] = COMPRESSED_LAYERS, engine: str | None = None) -> SppHead:
    """A copy of ``head`` whose ``layers`` are dynamic int8 linear layers (weights per output channel), packed for
    ``engine`` (default ``int8_engine()``)."""
    check_combination("int8", torch.float32, next(head.parameters()).device)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings(), _quantized_engine(engine or int8_engine()):
        # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        return quantize_dynamic(head, {name: per_channel_dynamic_qconfig for name in layers}, dtype=torch.qint8,
                                inplace=False)


class Int8LinearReLU(nn.Module):
    """``relu(x W^T + b)`` of a float ``nn.Linear``, on oneDNN's int8 GEMM: ``W`` quantized per output channel
    (symmetric int8, ``max |w| / 127.5`` per row, as PyTorch's per-channel observer), the input as uint8
    ``QuantizedRows`` (float input is quantized per batch first), int32 accumulation, then the two scales, the
    bias and the ReLU applied in the same call, float32 (or bfloat16) out. ``column_order``: the input's columns are the
    layer's in this order (its weight columns are stored so). Inference only, CPU only."""

    def __init__(self, linear: nn.Linear, column_order: torch.Tensor | None = None):
        super().__init__()
        weight = linear.weight.detach().to("cpu", torch.float32)
        self.column_order = None if column_order is None else torch.as_tensor(column_order, dtype=torch.int64)
        if self.column_order is not None:  # input columns in this order (e.g. SPP's bin-major uint8 rows)
            weight = weight[:, self.column_order]
        self.in_features, self.out_features = int(linear.in_features), int(linear.out_features)
        scale = (weight.abs().amax(1) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
        self.weight_scale = scale
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.int64)
        quantized = torch.round(weight / scale[:, None]).clamp_(-128, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(quantized, None)  # oneDNN's own layout of the int8 weights
        self.bias = (linear.bias.detach().to("cpu", torch.float32).clone() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor | quant.QuantizedRows, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x``: uint8 rows in any column order (reordered to the layer's), or float rows in the net's order.
        ``out_dtype``: float32, or bfloat16 (half the bytes written) for an output that is quantized next."""
        rows = (x if isinstance(x, quant.QuantizedRows) else quant.quantize_rows(x)).in_order(self.column_order)
        if rows.shape[1] != self.in_features:
            raise ValueError(f"rows of {rows.shape[1]} columns for a layer of {self.in_features} inputs")
        if len(rows) == 0:  # oneDNN refuses an empty batch
            return torch.zeros((0, self.out_features), dtype=out_dtype)
        return torch.ops.onednn.qlinear_pointwise(
            rows.values.contiguous(), float(rows.scale), int(rows.zero_point), self.packed, self.weight_scale,
            self.weight_zero_point, self.bias, 1.0, 0, out_dtype, "relu", [None], "")

    def __deepcopy__(self, memo) -> "Int8LinearReLU":
        # oneDNN's packed weights are an opaque tensor that cannot be copied; nothing ever writes to them, so a copy
        # shares them and copies the rest.
        clone = Int8LinearReLU.__new__(Int8LinearReLU)
        memo[id(self)] = clone
        nn.Module.__init__(clone)
        clone.in_features, clone.out_features, clone.packed = self.in_features, self.out_features, self.packed
        clone.column_order = None if self.column_order is None else self.column_order.clone()
        clone.weight_scale, clone.weight_zero_point = self.weight_scale.clone(), self.weight_zero_point.clone()
        clone.bias = None if self.bias is None else self.bias.clone()
        clone.train(self.training)
        return clone

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu=True"


def onednn_hidden_dtype() -> torch.dtype:
    """What ``Int8SppHead``'s fc6 hands fc7. Its activations only go on to be quantized to uint8 for fc7, so
    bfloat16 (relative rounding error up to 2^-8: near a batch's largest value about one uint8 step, so some codes
    move by one) is enough, and fc6's int8 GEMM writes half the bytes: fc6 + fc7 ran 1.1x faster in a one-off check
    (1,800 rows of ZF-5's 12,800 -> 4,096 -> 4,096, 2 threads). fc6 as a feature is still float32."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def int8_kernels() -> str:
    """Which int8 kernels (and, for oneDNN's, which fc6 -> fc7 hand-off) make int8 features here: they differ in
    rounding, so a stage's config record holds this and SVMs know which features they saw."""
    engine = int8_engine()
    if engine == "onednn" and onednn_hidden_dtype() == torch.bfloat16:
        return "onednn-bf16-hidden"
    return engine


class Int8SppHead(SppHead):
    """An ``SppHead`` whose fc6 and fc7 are ``Int8LinearReLU`` (ReLU included) and whose fc8 is a float copy of
    the head's: fc6 takes uint8 ``QuantizedRows`` (``input_dtype`` is ``torch.uint8``; float rows are quantized
    per batch), fc7 the quantized fc6 activations. Built from a trained head, never trained or saved."""

    def __init__(self, head: SppHead):
        nn.Module.__init__(self)  # not SppHead's: every layer comes from ``head``
        self.in_channels, self.pyramid, self.fc_dim = head.in_channels, head.pyramid, head.fc_dim
        self.num_classes, self.dropout_p, self.dropout = head.num_classes, head.dropout_p, nn.Identity()
        # fc6's weights are stored for SPP's uint8 rows in their bin-major order (no transposition when pooling)
        self.fc6 = Int8LinearReLU(head.fc6, spp.yxc_order(head.in_channels, head.pyramid))
        self.fc7 = Int8LinearReLU(head.fc7)
        self.fc8 = copy.deepcopy(head.fc8).float()
        self.hidden_dtype = onednn_hidden_dtype()
        self.eval()

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.uint8

    def forward(self, pooled) -> torch.Tensor:
        return self.fc8(self.fc7(self.fc6(pooled, self.hidden_dtype)))

    def features(self, pooled, layer: str = "fc7") -> torch.Tensor:
        if layer == "pool5":
            return pooled.dequantize() if isinstance(pooled, quant.QuantizedRows) else pooled
        if layer not in ("fc6", "fc7", "softmax"):
            raise ValueError(f"unknown feature layer {layer!r} (known: pool5, fc6, fc7, softmax)")
        if layer == "fc6":
            return self.fc6(pooled)  # uint8 rows in any column order, or float rows in the net's
        x = self.fc6(pooled, self.hidden_dtype)
        x = self.fc7(x)
        return x if layer == "fc7" else F.softmax(self.fc8(x), dim=1)

    def set_dropout(self, p: float) -> None:
        raise SppError("an int8 head is for inference only: it has no dropout to set")


INT8_LAYERS = (Int8Linear, Int8LinearReLU)  # what an int8 fc layer is, on either engine


def check_combination(compression: str, dtype: torch.dtype | str = torch.float32,
                      device: torch.device | str = "cpu") -> None:
    """Refuse, in one line, what ``compress_head`` cannot make: an unknown method, int8 in bfloat16 (int8 layers
    take float32 input) or int8 off the CPU."""
    dtype_name = str(dtype).replace("torch.", "")
    if compression not in FC_COMPRESSIONS:
        raise SppError(f"unknown fc compression {compression!r} (known: {', '.join(FC_COMPRESSIONS)})")
    if compression == "int8" and dtype_name != "float32":
        raise SppError(f"detect.fc_compression 'int8' takes float32 input, not {dtype_name} (fc dtype float32)")
    if compression == "int8" and torch.device(device).type != "cpu":
        raise SppError("detect.fc_compression 'int8' runs on the CPU only (PyTorch's quantized linear layers); use "
                       f"'svd' on {torch.device(device).type}, or the CPU")


def compress_head(head: SppHead, compression: str = "none", svd_ranks: Sequence[int] = (1024, 256),
                  dtype: torch.dtype = torch.float32) -> SppHead:
    """A copy of ``head`` in eval mode, fc6/fc7 compressed by ``compression`` ("none" | "svd" | "int8", with
    ``svd_ranks`` = (fc6 rank, fc7 rank) for "svd"), then in ``dtype`` (float32 or bfloat16; int8 layers take
    float32 input, so "int8" with bfloat16 is refused). ``head`` itself is untouched."""
    check_combination(compression, dtype, next(head.parameters()).device)
    if len(svd_ranks) != len(COMPRESSED_LAYERS):
        raise SppError(f"svd ranks are one per layer of {', '.join(COMPRESSED_LAYERS)}, got {list(svd_ranks)}")
    if compression == "int8":
        return Int8SppHead(head) if int8_engine() == "onednn" else quantize_int8(head).eval()
    compressed = copy.deepcopy(head).eval()
    if compression == "svd":
        for name, rank in zip(COMPRESSED_LAYERS, svd_ranks):
            setattr(compressed, name, truncated_svd(getattr(head, name), int(rank)))
    return compressed.to(dtype)


def configured_head(head: SppHead, detect_cfg) -> SppHead:
    """``compress_head`` as the run's ``detect`` section says (``fc_compression``, ``fc_svd_ranks``), in float32;
    ``head`` itself when that is "none" (nothing to copy)."""
    if detect_cfg.fc_compression == "none":
        return head
    return compress_head(head, detect_cfg.fc_compression, detect_cfg.fc_svd_ranks)


def compression_record(detect_cfg, uses_fc: bool = True) -> dict:
    """What a stage's config record holds of the fc compression, so that results made with it never pass for
    exact ones: nothing for "none" (records made before the setting existed stay valid) nor when the feature
    uses no fc layer (pool5); else the method, and the ranks for "svd"."""
    if not uses_fc or detect_cfg.fc_compression == "none":
        return {}
    record = {"fc_compression": detect_cfg.fc_compression}
    if detect_cfg.fc_compression == "int8":  # the two int8 heads differ in rounding: SVMs know which they saw
        record["fc_int8_kernels"] = int8_kernels()
    if detect_cfg.fc_compression == "svd":
        record["fc_svd_ranks"] = [int(r) for r in detect_cfg.fc_svd_ranks]
    return record


def detect_record(detect_cfg, uses_fc: bool = True) -> dict:
    """The ``detect`` section as detect's config record holds it: ``fc_compression`` / ``fc_svd_ranks`` only as
    ``compression_record`` says, ``test_flip`` only when on (detections made before these keys existed stay up
    to date)."""
    section = {key: value for key, value in dataclasses.asdict(detect_cfg).items()
               if key not in COMPRESSION_KEYS and not (key == "test_flip" and not value)}
    return json.loads(json.dumps(section)) | compression_record(detect_cfg, uses_fc)


def layer_summary(head: SppHead) -> dict:
    """Per compressed layer, what it became: ``{"fc6": {"in": .., "out": .., "rank": t or None, "int8": bool}}``
    (rank None: kept whole)."""
    summary = {}
    for name in COMPRESSED_LAYERS:
        layer = getattr(head, name)
        summary[name] = {"in": int(layer.in_features), "out": int(layer.out_features),
                         "rank": layer.rank if isinstance(layer, LowRankLinear) else None,
                         "int8": isinstance(layer, INT8_LAYERS)}
    return summary
