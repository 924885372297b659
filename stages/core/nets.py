"""The networks: ZF-5 (paper-exact, SPEC.md §1), torchvision trunks at stride 16, the SPP head, checkpoints.

A *backbone* maps a preprocessed image batch to its stride-16 "conv5" map and carries a ``BackboneSpec``: the
numbers the window -> cell mapping needs (stride, receptive-field centre of cell 0, inward offset) and the pixel
preprocessing it was trained with. ``SppHead`` holds fc6/fc7/fc8 over the pooled vector. ``SppNet`` = both, with
fixed-size SPP over the whole map for classification pretraining. Checkpoints hold only tensors and plain
values (``torch.load(weights_only=True)``) plus the architecture needed to rebuild them.

Backbones (``model.backbone``; all stride 16; offset0 = 1-based pixel at the receptive-field centre of cell 0,
derived from the layers by ``receptive_field`` and checked against the network in tests/test_nets.py):

==================  =========  ========  ===========================================================================
name                channels   offset0   trunk
==================  =========  ========  ===========================================================================
zf5                 256        21        ZF-5 conv1-conv5, SPEC §1 (``model.width`` scales its channels)
mobilenet_v2        96         1         torchvision MobileNetV2 ``features[:14]`` (cut before the stride-32 stage)
mobilenet_v2_c17    160        1         ``features[:17]``, the stride-32 stage kept at stride 16 by dilation
mobilenet_v2_c18    320        1         ``features[:18]``, likewise (all inverted-residual blocks)
mobilenet_v2_c19    1280       1         ``features[:19]``: the whole trunk with its final 1x1 conv, likewise
alexnet             256        16        torchvision AlexNet ``features[:12]`` (conv5 + ReLU, no pool5)
vgg16               512        8.5       torchvision VGG-16 ``features[:30]`` (conv5_3 + ReLU, no pool5)
resnet18            256        1         torchvision ResNet-18 conv1 .. layer3 (``conv4_x``)
resnet50            1024       1         torchvision ResNet-50 conv1 .. layer3 (``conv4_x``)
==================  =========  ========  ===========================================================================

``mobilenet_v2_cN`` is ``features[:N]`` with the stride-32 stage made stride 1 "a trous" (DeepLab's output
stride 16): the stride-2 depthwise conv of ``features[14]`` gets stride 1 and the 3x3 depthwise convs after it
(``features[15]`` on) dilation 2, padding 2. Cell 2i of the dilated map then equals cell i of the undilated
stride-32 map, so the ImageNet weights compute what they were trained to, sampled twice as densely.
``mobilenet_v2`` keeps its old meaning, so old checkpoints and runs still work. Every torchvision trunk loads a
local weights file of its ``features`` or of the whole model (classifier / layers past the cut are ignored,
the kept layers must match exactly), e.g. ``/work/shared/weights/mobilenet_v2_imagenet_features.pt`` for every
MobileNetV2 cut.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import atomic_write_bytes
from .errors import SppError
from .spp import DEFAULT_PYRAMID, spp_dim, spp_pool_full

MOBILENET_V2_CUTS = {"mobilenet_v2": 14, "mobilenet_v2_c17": 17, "mobilenet_v2_c18": 18, "mobilenet_v2_c19": 19}
RESNETS = ("resnet18", "resnet50")
BACKBONES = ("zf5", *MOBILENET_V2_CUTS, "alexnet", "vgg16", *RESNETS)
CHECKPOINT_FORMAT = "sppnet-checkpoint"
BACKGROUND = "__background__"  # class 0 of a fine-tuned net's fc8 (its class list starts with it)
CHECKPOINT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SPEC §2 step 3: conv5 windows are shrunk inward by 6.5 px on each side. With cell J's receptive-field centre
# at c_J = offset0 + 16 (J - 1), X0 = round((x1' + 6.5 - offset0)/16) + 1 picks the first cell whose centre is
# >= x1' - 1.5 (and X1 the last one <= x2' + 1.5): "cells whose centres lie in the box, with 1.5 px of slack"
# (the paper's floor(x/S) + 1 rule is the same idea). That rule is stated in centres and the stride, not in the
# receptive-field size, so every stride-16 trunk keeps offset = 6.5 and gets its own offset0 (its cell-0 centre).
WINDOW_OFFSET = 6.5
ZF5_PIXEL_STD = 64.0  # rough std of BGR-128 pixel values, for conv1's init


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    stride: int  # total stride of the conv5 map: 16
    channels: int  # conv5 channels
    offset0: float  # 1-based image pixel at the receptive-field centre of conv5 cell 0 (21 for ZF-5)
    offset: float  # inward shrink of windows in pixels (6.5, SPEC §2)
    pixel_mode: str  # "bgr128" (ZF-5, SPEC §3) or "imagenet" (torchvision trunks)


class WithinChannelLRN(nn.Module):
    """Caffe's WITHIN_CHANNEL LRN: ``y = x * (1 + alpha * mean_{size x size}(x^2))^(-beta)``.

    Caffe builds it as square -> AVE pool (size, stride 1, pad (size-1)/2) -> power(shift 1, scale alpha, -beta)
    -> product [C: lrn_layer.cpp]. Its AVE pool divides by the padded window (clipped to ``H + pad``), which for
    stride 1 and pad (size-1)/2 is always size^2: ``count_include_pad=True``. PyTorch's ``LocalResponseNorm``
    normalises across channels instead.
    """

    def __init__(self, local_size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        if local_size % 2 != 1:
            raise ValueError("local_size must be odd")
        self.local_size, self.alpha, self.beta = local_size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = F.avg_pool2d(x * x, self.local_size, stride=1, padding=self.local_size // 2,
                               count_include_pad=True)
        return x * (1.0 + self.alpha * mean_sq).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}"


class Backbone(nn.Module):
    """A conv trunk cut at stride 16: ``forward(x [B,3,H,W] preprocessed) -> conv5 [B,C,h,w]``."""

    def __init__(self, body: nn.Sequential, spec: BackboneSpec, width: float = 1.0):
        super().__init__()
        self.body = body
        self.spec = spec
        self.width = float(width)  # ZF-5's channel multiplier, kept so a checkpoint rebuilds the same trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ------------------------------------------------------------------------------------------------ trunks


ZF5_CHANNELS = (96, 256, 384, 384, 256)  # conv1..conv5 outputs [SPEC §1]


def zf5_channels(width: float = 1.0) -> tuple[int, ...]:
    """conv1..conv5 output channels of ZF-5 at ``width`` times the paper's (1.0: 96-256-384-384-256)."""
    if not 0 < width <= 4:
        raise SppError(f"model.width must be in (0, 4], got {width}")
    return tuple(max(1, round(c * width)) for c in ZF5_CHANNELS)


def _zf5_body(width: float = 1.0) -> nn.Sequential:
    """ZF-5 conv1-conv5 [S:model-defs/Zeiler_conv5.prototxt; SPEC §1]: ceil-mode pooling gives 13x13 at 224.
    ``width`` scales every layer's channels (the same kernels, strides and receptive fields)."""
    def lrn() -> WithinChannelLRN:
        return WithinChannelLRN(local_size=3, alpha=5e-5, beta=0.75)

    c1, c2, c3, c4, c5 = zf5_channels(width)
    body = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, c1, kernel_size=7, stride=2, padding=1)), ("relu1", nn.ReLU(inplace=True)),
        ("norm1", lrn()), ("pool1", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)),
        ("conv2", nn.Conv2d(c1, c2, kernel_size=5, stride=2, padding=0)), ("relu2", nn.ReLU(inplace=True)),
        ("norm2", lrn()), ("pool2", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)),
        ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1)), ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1)), ("relu5", nn.ReLU(inplace=True)),
    ]))
    if body.conv1.weight.is_meta:
        # Built on the meta device by load_checkpoint, which fills it from a file: no init to compute (normal_ and
        # division on meta tensors would import torch._dynamo and sympy, 2 s).
        return body
    # He init for training from scratch (no BatchNorm in ZF-5, so the scale matters); torchvision's VGG does this.
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    # He init assumes unit-variance inputs; BGR-128 pixels have a std of about 64. Without this, conv1's output
    # (and every step on its weights) is ~64x too large and from-scratch training sits at chance far longer.
    with torch.no_grad():
        body.conv1.weight /= ZF5_PIXEL_STD
    return body


def _materialise(modules: nn.Module, init=None) -> nn.Module:
    """Materialise modules built on the meta device (so a torchvision model's classifier or later layers are
    never allocated): re-run every module's own init, then the model's (``init``) when it has one."""
    modules = modules.to_empty(device="cpu")
    for module in modules.modules():
        if hasattr(module, "reset_parameters") and module is not modules:
            module.reset_parameters()
    if init is not None:
        init(modules)
    return modules


def _features_without_classifier(factory, init=None) -> nn.Sequential:
    """A torchvision model's ``features`` without allocating its (large) classifier."""
    with torch.device("meta"):
        features = factory().features
    return _materialise(features, init)


def _vgg_init(features: nn.Module) -> None:
    for module in features.modules():  # torchvision VGG's own init
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


def _resnet_init(body: nn.Module) -> None:
    for module in body.modules():  # torchvision ResNet's own init (zero_init_residual=False)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _dilate_mobilenet_v2(features: nn.Sequential) -> nn.Sequential:
    """Keep MobileNetV2's stride-32 stage (``features[14:]``) at stride 16 "a trous", in place.

    ``features[14]``'s 3x3 depthwise conv (stride 2, padding 1) gets stride 1; every later 3x3 depthwise conv
    gets dilation 2, padding 2. Its taps then fall where the undilated network's did (two stride-16 cells
    apart = one stride-32 cell), so cell 2i equals the undilated cell i exactly (tested). The strided conv
    itself keeps dilation 1, as in DeepLab's TF MobileNetV2 (``output_stride``) and torchvision's ResNet
    ``replace_stride_with_dilation``; dilating it too (torchvision's MobileNetV3) would spread its taps to
    twice the spacing it was trained with. No weight changes shape, so the ImageNet file loads unchanged.
    """
    for index in range(14, min(len(features), 18)):  # the inverted-residual blocks of the stride-32 stage
        depthwise = features[index].conv[1][0]
        if not (isinstance(depthwise, nn.Conv2d) and depthwise.groups == depthwise.in_channels > 1
                and depthwise.kernel_size == (3, 3)):
            raise AssertionError(f"mobilenet_v2 features[{index}].conv[1][0] is not a 3x3 depthwise conv")
        if index == 14:
            depthwise.stride = (1, 1)
            features[index].stride = 1
        else:
            depthwise.dilation, depthwise.padding = (2, 2), (2, 2)
    return features


class MobileNetV2Block(nn.Module):
    """torchvision's MobileNetV2 ``InvertedResidual`` (same attributes, children and forward): built by
    ``_mobilenet_v2_features`` on the meta device."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` as MobileNetV2 uses it (BatchNorm, ReLU6)."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


def _mobilenet_v2_features() -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features`` module tree (width 1.0): the same layers and state-dict keys,
    without importing torchvision (2-3 s: ``torchvision.ops`` imports ``torch._dynamo``). Only for a build on the
    meta device that a checkpoint then fills (``load_checkpoint(random_init=False)``): a real build takes
    torchvision's own, whose init draws from the seeded RNG (tests/test_trunks.py checks the two agree)."""
    layers, channels = [_conv_bn_relu6(3, 32, 3, 2)], 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):  # torchvision's inverted_residual_setting (t, c, n, s)
        for i in range(n):
            layers.append(MobileNetV2Block(channels, c, s if i == 0 else 1, t))
            channels = c
    layers.append(_conv_bn_relu6(channels, 1280, 1))
    return nn.Sequential(*layers)


def _full_trunk(name: str) -> tuple[nn.Sequential, frozenset[str]]:
    """(the trunk cut at stride 16, randomly initialised; the first key parts of the torchvision ``features``
    or model state dict that belong to layers past the cut, which a weights file may hold and is not asked
    to fit). Keys are torchvision's own, so its files load without renaming."""
    if name in MOBILENET_V2_CUTS:
        cut = MOBILENET_V2_CUTS[name]
        # features[14] is the next stride-2 block; [:14] ends with 96 channels at stride 16. The longer cuts
        # run the stride-32 stage dilated instead (built the same way, so a seed gives [:14] the same weights).
        if torch.get_default_device().type == "meta":  # structure only: a checkpoint fills it
            features = _mobilenet_v2_features()
        else:
            import torchvision.models as tvm

            features = tvm.mobilenet_v2(weights=None).features
        body = features[:cut] if cut == 14 else _dilate_mobilenet_v2(features[:cut])
        return body, frozenset(str(i) for i in range(cut, len(features)))
    import torchvision.models as tvm

    if name == "alexnet":
        # features[12] is the last max-pool; without it conv5+ReLU has stride 4*2*2 = 16, 256 channels.
        return _features_without_classifier(tvm.alexnet)[:12], frozenset({"12"})
    if name == "vgg16":
        # features[30] is pool5; [:30] ends at conv5_3 + ReLU, stride 2^4 = 16, 512 channels.
        return _features_without_classifier(tvm.vgg16, _vgg_init)[:30], frozenset({"30"})
    if name in RESNETS:
        # Cut after layer3 (conv4_x: stride 16; 1024 channels for resnet50, 256 for resnet18) rather than
        # keeping layer4 dilated: it is the shared trunk of the ResNet detectors (He et al. 2016's Faster R-CNN
        # runs conv1..conv4_x per image and conv5_x per region), and a dilated layer4 would cost 4x its FLOPs
        # at stride 16 (about as much as the rest together) and give 2048 channels, i.e. a 102,400-d pooled
        # vector (fc6 alone 420M weights at fc_dim 4096).
        with torch.device("meta"):
            model = getattr(tvm, name)(weights=None)
        body = nn.Sequential(OrderedDict((key, getattr(model, key)) for key in
                                         ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
        return _materialise(body, _resnet_init), frozenset({"layer4", "fc"})
    raise SppError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")


# Modules that do not move or resample the map (elementwise, or per-pixel across channels).
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Identity, nn.Dropout, nn.BatchNorm2d,
              WithinChannelLRN)


def receptive_field(body: nn.Module) -> tuple[int, float]:
    """(total stride, 1-based image pixel at the receptive-field centre of output cell 0) of a trunk.

    A layer with kernel k, stride s, padding p and dilation d centres its output cell 0 on input position
    ``d (k - 1)/2 - p``; a chain composes those (x direction). Residual blocks (torchvision ResNet's BasicBlock
    and Bottleneck, MobileNetV2's InvertedResidual) add a shortcut to their main path: the shortcut must map
    cells to the same centres (a strided 1x1 ``downsample`` does; an identity shortcut needs a main path of
    stride 1 centred in place), else this raises. Any other module with children must be an ``nn.Sequential``
    and any leaf a conv, a pooling layer or a pointwise layer: an unknown layer raises rather than be guessed.
    ZF-5: 2 (conv1) + 2 (pool1) + 8 (conv2) + 8 (pool2) = 20 (0-based) -> 21, SPEC §1.
    """
    jump, centre = _field(body)
    if jump != int(jump):
        raise AssertionError(f"non-integer total stride {jump}")
    return int(jump), centre + 1.0


def _field(module: nn.Module) -> tuple[float, float]:
    """(stride, 0-based input position of output cell 0's centre) of one module."""
    residual, inverted = _torchvision_blocks()
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        kernel, stride, padding = (_first(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
        dilation = _first(getattr(module, "dilation", 1))
        return stride, dilation * (kernel - 1) / 2.0 - padding
    if isinstance(module, _POINTWISE):
        return 1, 0.0
    if isinstance(module, residual):
        main = _chain(child for key, child in module.named_children() if key != "downsample")
        shortcut = _field(module.downsample) if module.downsample is not None else (1, 0.0)
        return _same_geometry(module, main, shortcut)
    if isinstance(module, inverted):
        main = _field(module.conv)
        return _same_geometry(module, main, (1, 0.0)) if module.use_res_connect else main
    if type(module) is nn.Sequential or (isinstance(module, nn.Sequential) and type(module).forward is
                                          nn.Sequential.forward):
        return _chain(module.children())
    raise TypeError(f"receptive_field: no rule for {type(module).__name__}")


def _torchvision_blocks() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The residual block classes: torchvision's ((BasicBlock, Bottleneck), (InvertedResidual,)) with our
    ``MobileNetV2Block``; torchvision's only when it is imported (no module can be one of them before), so that a
    trunk built without it does not pay its 2-3 s import."""
    if "torchvision.models" not in sys.modules:
        return (), (MobileNetV2Block,)
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (BasicBlock, Bottleneck), (InvertedResidual, MobileNetV2Block)


def _chain(modules) -> tuple[float, float]:
    jump, centre = 1, 0.0
    for module in modules:
        step, start = _field(module)
        centre += start * jump
        jump *= step
    return jump, centre


def _same_geometry(block: nn.Module, main: tuple[float, float], shortcut: tuple[float, float]) -> tuple[float, float]:
    if main != shortcut:
        raise AssertionError(f"{type(block).__name__}: main path (stride, centre) {main} != shortcut {shortcut}")
    return main


def _first(value) -> int:
    return int(value[-1] if isinstance(value, (tuple, list)) else value)


def _spec_for(name: str, body: nn.Sequential, channels: int, pixel_mode: str) -> BackboneSpec:
    stride, offset0 = receptive_field(body)
    if stride != 16:
        raise AssertionError(f"{name} trunk has stride {stride}, expected 16")
    return BackboneSpec(name=name, stride=stride, channels=channels, offset0=offset0, offset=WINDOW_OFFSET,
                        pixel_mode=pixel_mode)


def build_backbone(name: str, weights: str = "", width: float = 1.0) -> Backbone:
    """One of ``BACKBONES`` (module docstring), randomly initialised, or with ``weights``: a local file
    (a state dict of the trunk, of the torchvision ``features`` or whole model, or an sppnet checkpoint), or a
    torchvision weights name such as ``"MobileNet_V2_Weights.IMAGENET1K_V1"`` (downloads once). ``width``
    scales ZF-5's channels (the torchvision trunks have fixed widths)."""
    if name == "zf5":
        body, past_cut = _zf5_body(width), frozenset()
        spec = _spec_for(name, body, zf5_channels(width)[-1], "bgr128")
    elif width != 1.0:
        raise SppError(f"model.width applies to zf5 only; {name} has a fixed width (set model.width = 1.0)")
    else:
        body, past_cut = _full_trunk(name)
        channels = [m for m in body.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        spec = _spec_for(name, body, channels, "imagenet")
    if weights:
        _load_weights(body, name, weights, past_cut)
    return Backbone(body, spec, width)


def _load_weights(body: nn.Sequential, name: str, weights: str, past_cut: frozenset[str]) -> None:
    path = Path(weights).expanduser()
    if path.exists():
        state = _read_state_file(path)
        source = str(path)
    elif re.fullmatch(r"\w+_Weights\.\w+", weights):
        state, source = _torchvision_state(name, weights), weights
    else:
        raise SppError("no such weights file (and not a torchvision weights name like "
                       "'MobileNet_V2_Weights.IMAGENET1K_V1')", path)
    state = _trunk_keys(state)
    # torchvision trunks: a file of the whole ``features`` or model also holds layers past the cut (and the
    # classifier, which ``_trunk_keys`` drops with the "features." prefix; ResNets name theirs "fc").
    state = {key: value for key, value in state.items() if key.split(".", 1)[0] not in past_cut}
    try:
        body.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise SppError(f"weights do not fit the {name} trunk ({detail})", source) from None


def load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line. A file that needs more than tensors and plain
    values (pickled classes or functions, which could run code) is said to be refused; torch's own message
    suggests ``weights_only=False``, which is exactly what must not be done with a file of unknown origin."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return ("refused: it holds pickled Python objects" + (f" ({found.group(1)})" if found else "")
                + " besides tensors; only weights are loaded (torch.load weights_only=True)")
    return f"{type(exc).__name__}: {text[:200]}"


def _read_state_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
        raise SppError(f"unreadable weights file ({load_failure(exc)})", path) from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("state_dict", {})
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SppError("not a state dict of tensors", path)
    return obj


def _trunk_keys(state: dict) -> dict:
    """Strip the wrappers our own and torchvision's files put around the trunk's keys."""
    for prefix in ("backbone.body.", "body.", "features."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _torchvision_state(name: str, weights_name: str) -> dict:
    import torchvision.models as tvm

    try:
        weights = tvm.get_weight(weights_name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise SppError(f"unknown torchvision weights {weights_name!r} ({exc})") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - network and cache failures become one line
        raise SppError(f"could not fetch torchvision weights {weights_name!r} ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------------ preprocessing


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size after resizing so the shorter side is ``short_side``; the longer side rounds up (ceil, [T]), computed
    in integers so an exact ratio never rounds past an integer."""
    height, width, short_side = int(height), int(width), int(short_side)
    if min(height, width) < 1 or short_side < 1:
        raise ValueError(f"cannot resize {height}x{width} to shorter side {short_side}")
    if height <= width:
        return short_side, -(-width * short_side // height)
    return -(-height * short_side // width), short_side


def preprocess(image: np.ndarray, short_side: int, spec: BackboneSpec,
               device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB [H,W,3] -> float32 [3,h,w] network input at shorter side ``short_side`` (SPEC §3).

    ``bgr128`` (ZF-5): RGB -> BGR, minus the constant 128, no /255. ``imagenet``: RGB/255, minus mean, over std.
    Then a bilinear resize without antialiasing (``align_corners=False``, the MATLAB ``imresize`` pixel-centre
    mapping) to ``resized_hw``. ``device`` runs the resize there (a GPU makes the large scales cheap).
    """
    image = np.asarray(image)
    if image.ndim == 2:  # grey: replicate like the reader does
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H,W,3], got {image.dtype} {image.shape}")
    if not image.flags.writeable:  # e.g. a memory-mapped or cached array: torch wants writable memory
        image = image.copy()
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()
    if spec.pixel_mode == "bgr128":
        pixels = pixels.flip(0) - 128.0
    elif spec.pixel_mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
        pixels = (pixels / 255.0 - mean) / std
    else:
        raise ValueError(f"unknown pixel mode {spec.pixel_mode!r}")
    size = resized_hw(image.shape[0], image.shape[1], short_side)
    if size != tuple(image.shape[:2]):
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return pixels.contiguous()


def conv5_maps(backbone: "Backbone", images: torch.Tensor,
               memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """conv5 [B, C, h, w] of preprocessed ``images`` [B, 3, H, W], the convolutions run in ``memory_format``:
    by default channels-last (NHWC), the layout oneDNN and cuDNN are fastest in: 1.75x for ZF-5 and 1.5x for
    MobileNetV2 at 688 px on 2 CPU threads, the same values to float rounding (``spp bench`` can time either).
    The maps keep their channels-last strides: SPP pooling reads them as [h, w, C], so no copy is made here;
    ``.contiguous()`` where a C-order array is needed."""
    return backbone(images.contiguous(memory_format=memory_format))


# ------------------------------------------------------------------------------------------------ head and net


class SppHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 over the pooled vector (SPEC §1).

    fc6 reads ``in_channels * sum(n^2)`` inputs laid out as ``spp.spp_pool`` writes them.
    """

    def __init__(self, in_channels: int, pyramid: Sequence[int] = DEFAULT_PYRAMID, fc_dim: int = 4096,
                 num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.in_channels = int(in_channels)
        self.pyramid = tuple(int(n) for n in pyramid)
        self.fc_dim = int(fc_dim)
        self.num_classes = int(num_classes)
        self.set_dropout(dropout)
        self.fc6 = nn.Linear(spp_dim(in_channels, self.pyramid), self.fc_dim)
        self.fc7 = nn.Linear(self.fc_dim, self.fc_dim)
        self.fc8 = nn.Linear(self.fc_dim, self.num_classes)
        for layer in (self.fc6, self.fc7, self.fc8):  # N(0, 0.01) weights [S finetune prototxt; torchvision VGG]
            if not layer.weight.is_meta:  # a meta build is filled from a file (see _zf5_body)
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.zeros_(layer.bias)

    @property
    def in_features(self) -> int:
        return self.fc6.in_features

    @property
    def input_dtype(self) -> torch.dtype:
        """What fc6 takes: its weights' type (bfloat16 for a bfloat16 copy, detect.fc_dtype); float32 for int8
        layers, which hold no float weights (core/fccompress.py)."""
        return next((p.dtype for p in self.fc6.parameters()), torch.float32)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.fc6(pooled)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)

    def features(self, pooled: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Post-ReLU fc6 or fc7 features, never with dropout (inverted dropout needs no test-time scaling, §9.5).
        ``"pool5"`` returns the pooled input itself."""
        if layer == "pool5":
            return pooled
        if layer not in ("fc6", "fc7", "softmax"):
            raise ValueError(f"unknown feature layer {layer!r} (known: pool5, fc6, fc7, softmax)")
        x = F.relu(self.fc6(pooled))
        if layer == "fc6":
            return x
        x = F.relu(self.fc7(x))
        return x if layer == "fc7" else F.softmax(self.fc8(x).float(), dim=1)

    def set_dropout(self, p: float) -> None:
        """Train-time dropout after fc6 and fc7 (pretraining and fine-tuning may use different rates)."""
        if not 0 <= p < 1:
            raise SppError(f"fc dropout (pretrain.dropout, model.dropout) must be in [0, 1), got {p}")
        self.dropout_p = float(p)
        self.dropout = nn.Dropout(self.dropout_p)

    def replace_fc8(self, num_classes: int) -> nn.Linear:
        """A new fc8 for ``num_classes`` with N(0, 0.01) weights [P §4.1]. Bias 0: the released prototxt fills it
        with 1, which a softmax cannot see (a constant shift of every logit), and fc8's bias has no decay."""
        layer = nn.Linear(self.fc_dim, int(num_classes))
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
        self.fc8 = layer.to(self.fc7.weight.device, self.fc7.weight.dtype)
        self.num_classes = int(num_classes)
        return self.fc8


class SppNet(nn.Module):
    """Backbone + fixed-size SPP over the whole conv5 map + SppHead: ``forward(images) -> logits``."""

    def __init__(self, backbone: Backbone, pyramid: Sequence[int] = DEFAULT_PYRAMID, fc_dim: int = 4096,
                 num_classes: int = 1000, dropout: float = 0.5, class_names: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.pyramid = tuple(int(n) for n in pyramid)
        self.head = SppHead(backbone.spec.channels, self.pyramid, fc_dim, num_classes, dropout)
        self.class_names = tuple(class_names)

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    def conv5(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(spp_pool_full(self.backbone(images), self.pyramid))

    def architecture(self) -> dict:
        """The plain values that rebuild this network (stored in checkpoints)."""
        return {"backbone": self.spec.name, "spec": asdict(self.spec), "pyramid": list(self.pyramid),
                "fc_dim": self.head.fc_dim, "num_classes": self.head.num_classes, "dropout": self.head.dropout_p,
                "width": self.width}

    @property
    def width(self) -> float:
        return self.backbone.width


def build_sppnet(backbone: str, weights: str = "", pyramid: Sequence[int] = DEFAULT_PYRAMID, fc_dim: int = 4096,
                 num_classes: int = 1000, dropout: float = 0.5, class_names: Sequence[str] = (),
                 width: float = 1.0) -> SppNet:
    """A fresh SppNet (``weights`` initialise the trunk only); the stages build it from ``cfg.model``."""
    return SppNet(build_backbone(backbone, weights, width), pyramid, fc_dim, num_classes, dropout, class_names)


def resolve_device(name: str = "auto") -> torch.device:
    """``cfg.device``: "auto" -> cuda when available, else cpu; "cuda" without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SppError(f"device {name!r} requested but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SppError(f"unknown device {name!r} (use auto, cpu or cuda)") from None


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | Path, model: SppNet, meta: dict | None = None) -> str:
    """Write ``{format, version, state_dict, meta}`` atomically. ``meta`` is the caller's (plain values: class
    names, training info); the architecture fields come from ``model`` itself and override it. Returns the
    file's ``conv_layers_sha256``, from the tensors just written (no second read)."""
    if not isinstance(model, SppNet):
        raise TypeError(f"save_checkpoint expects an SppNet, got {type(model).__name__}")
    meta = dict(meta or {})
    meta.update(model.architecture())
    class_names = list(meta.get("class_names") or model.class_names)
    if class_names and len(class_names) != model.head.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.head.num_classes} outputs")
    meta["class_names"] = [str(c) for c in class_names]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": state, "meta": meta},
               buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return _conv_layers_digest(meta, state)


def conv_layers_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint's conv layers alone (backbone name, width and ``backbone.*`` tensors): what its conv5
    maps depend on. fc6-fc8, the pyramid and the class list can change without changing it."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = obj["meta"], obj["state_dict"]
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is one user-facing line
        raise SppError(f"unreadable checkpoint ({load_failure(exc)})", path) from None
    return _conv_layers_digest(meta, state)


def _conv_layers_digest(meta: dict, state: dict) -> str:
    import hashlib

    digest = hashlib.sha256(f"{meta.get('backbone')}|{meta.get('width', 1.0)}".encode())
    for key in sorted(k for k in state if k.startswith("backbone.")):
        tensor = state[key]
        digest.update(f"|{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's counter) cannot be viewed as bytes
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | Path, expect_backbone: str | None = None,
                    map_location: str | torch.device = "cpu", *, random_init: bool = True) -> tuple[SppNet, dict]:
    """(SppNet, meta) from ``save_checkpoint``'s file; any problem is one SppError line naming the file.

    ``random_init=False`` builds the network on the meta device and takes every tensor from the file: no random
    init is computed (0.3-1 s a model, which the file's weights replace anyway) and the global RNG is left as it
    was. The default draws from it as a fresh build does, which callers that seed before loading rely on
    (pretrain from a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise SppError("no such checkpoint", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is one user-facing line
        raise SppError(f"unreadable checkpoint ({load_failure(exc)})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise SppError("not an sppnet checkpoint", path)
    if obj.get("version") != CHECKPOINT_VERSION:
        raise SppError(f"checkpoint version {obj.get('version')!r}, this code reads {CHECKPOINT_VERSION}", path)
    meta, state = obj.get("meta"), obj.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise SppError("checkpoint lacks its meta or state_dict", path)
    backbone = meta.get("backbone")
    if expect_backbone is not None and backbone != expect_backbone:
        raise SppError(f"checkpoint is for backbone {backbone}, the run uses {expect_backbone}", path)
    if backbone not in BACKBONES:
        raise SppError(f"checkpoint names an unknown backbone {backbone!r}", path)
    try:
        with contextlib.nullcontext() if random_init else torch.device("meta"):
            model = SppNet(build_backbone(backbone, width=meta.get("width", 1.0)), meta["pyramid"], meta["fc_dim"],
                           meta["num_classes"], meta.get("dropout", 0.5), meta.get("class_names", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise SppError(f"checkpoint meta is incomplete ({type(exc).__name__}: {exc})", path) from None
    try:
        model.load_state_dict(state, strict=True, assign=not random_init)
    except RuntimeError as exc:
        raise SppError(f"checkpoint weights do not match its architecture ({' '.join(str(exc).split())[:300]})",
                       path) from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the file does not hold
        raise SppError("checkpoint lacks some of its architecture's tensors", path)
    return model.to(map_location), meta
