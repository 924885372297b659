"""R-CNN mode: the same backbone and fc layers applied the R-CNN way, one warped crop per window (for the speed
comparison of SPP-net's Table 10, where both methods use the same pretrained ZF-5).

R-CNN [R:features/rcnn_im_crop.m, "warp" mode] pads every window with ``context`` pixels of image context *in the
warped frame*: the box is grown about its centre by ``input_size / (input_size - 2 * context)`` (224/192 here),
the grown box is warped anisotropically to ``input_size x input_size`` with bilinear interpolation (no
antialiasing), and whatever falls outside the image is the mean pixel (zero after mean subtraction). Then every
crop runs through the conv layers. Here the conv5 map of each crop (13 x 13 for ZF-5 at 224) is pooled with the
same SPP pyramid over the whole map (``spp.spp_pool_full``), so fc6 gets the input size it was trained on and the
fc layers are literally the same.

Differences from ``rcnn_im_crop.m``: the grown box is not rounded to whole pixels and the warp samples the
preprocessed image directly (one ``grid_sample`` per batch of windows, on the device), so there is no separate
"resize the clipped part, then paste it into a zero canvas" step; the border pixels of a window that sticks out of
the image therefore blend with the zero padding over one pixel instead of stopping at a rounded edge.

The warp is exact bilinear resampling with MATLAB's pixel-centre mapping (``align_corners=False``): output pixel
``u`` samples input ``x = bx1 + (u + 0.5) * bw / S - 0.5`` (0-based pixel indices). For a box covering the whole
image with no context that is ``F.interpolate(..., mode="bilinear", align_corners=False)``, i.e. the resize of
``nets.preprocess``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from . import nets, spp
from .fcfeatures import head_rows

RCNN_INPUT_SIZE = 224  # the ZF-5 input whose conv5 map (13 x 13) SPP was trained on; R-CNN's AlexNet used 227
RCNN_CONTEXT = 16  # pixels of context around each window in the warped frame [R:rcnn_im_crop.m padding = 16]
RCNN_BATCH = 32  # windows per conv batch: efficient convolutions, ~150 MB per conv1 activation on a CPU

# ``timer(name)`` returns a context manager that accounts the time spent inside it to phase ``name``.
Timer = Callable[[str], ContextManager]


def _no_timer(_name: str) -> ContextManager:
    return contextlib.nullcontext()


def context_boxes(boxes, input_size: int = RCNN_INPUT_SIZE, context: int = RCNN_CONTEXT) -> np.ndarray:
    """Boxes grown about their centres so that, warped to ``input_size``, the original box spans
    ``input_size - 2 * context`` pixels with ``context`` pixels of surrounding image on each side; float64 [N,4]
    in our ``[x1, y1, x2, y2)`` convention (not clipped: outside the image is padding)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not 0 <= 2 * context < input_size:
        raise ValueError(f"context {context} leaves no room in a {input_size}-pixel crop")
    grow = input_size / (input_size - 2.0 * context)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    half = (boxes[:, 2:] - boxes[:, :2]) / 2.0 * grow
    return np.concatenate([centre - half, centre + half], axis=1)


def warp_windows(pixels: torch.Tensor, boxes, input_size: int = RCNN_INPUT_SIZE,
                 context: int = RCNN_CONTEXT) -> torch.Tensor:
    """Crop and warp every window of a preprocessed image: ``pixels`` float [3,H,W] -> [N,3,S,S] on its device.

    One ``affine_grid`` + ``grid_sample`` for all ``N`` windows (no Python loop over windows): each window's grid
    is the affine map of the output square onto its context-grown box, bilinear, zero outside the image.
    """
    if pixels.dim() != 3:
        raise ValueError(f"expected a preprocessed image [3,H,W], got shape {tuple(pixels.shape)}")
    channels, height, width = pixels.shape
    grown = context_boxes(boxes, input_size, context)
    count = len(grown)
    if count == 0:
        return pixels.new_zeros((0, channels, input_size, input_size))
    # affine_grid's normalised output coordinate un = (2u + 1)/S - 1 maps to the input's normalised coordinate
    # (2x + 1)/W - 1 with x = bx1 + (u + 0.5) bw/S - 0.5, i.e. (bw/W) * un + (2 cx / W - 1), cx the box centre.
    grown_t = torch.as_tensor(grown, dtype=torch.float64)
    size = grown_t[:, 2:] - grown_t[:, :2]  # (bw, bh)
    centre = (grown_t[:, :2] + grown_t[:, 2:]) / 2.0
    extent = torch.tensor([width, height], dtype=torch.float64)
    theta = torch.zeros((count, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = size[:, 0] / extent[0]
    theta[:, 1, 1] = size[:, 1] / extent[1]
    theta[:, :, 2] = 2.0 * centre / extent - 1.0
    grid = F.affine_grid(theta.to(device=pixels.device, dtype=pixels.dtype), [count, channels, input_size, input_size],
                         align_corners=False)  # [N, S, S, 2]
    # All windows sample the one image: stack their grids along y so the image is not repeated N times.
    stacked = grid.reshape(1, count * input_size, input_size, 2)
    out = F.grid_sample(pixels[None], stacked, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].view(channels, count, input_size, input_size).transpose(0, 1).contiguous()


def _pixels(image, spec: nets.BackboneSpec, device: torch.device | str | None) -> torch.Tensor:
    """uint8 RGB [H,W,3] -> the backbone's pixel values at the original size; a tensor passes through."""
    if isinstance(image, torch.Tensor):
        return image.to(device) if device is not None else image
    image = np.asarray(image)
    return nets.preprocess(image, min(image.shape[:2]), spec, device=device)  # shorter side kept: no resize


def rcnn_window_pooled(backbone: torch.nn.Module, image, boxes, spec: nets.BackboneSpec,
                       pyramid: Sequence[int] = spp.DEFAULT_PYRAMID, input_size: int = RCNN_INPUT_SIZE,
                       context: int = RCNN_CONTEXT, batch: int = RCNN_BATCH, timer: Timer | None = None,
                       memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """R-CNN-mode pooled conv5 ("pool5") of every window: [N, C * sum(n^2)] float32 on the backbone's device.

    ``image``: uint8 RGB [H,W,3] (preprocessed here for ``spec``) or an already preprocessed float [3,H,W] tensor.
    Windows go through the conv layers ``batch`` at a time. ``timer`` (optional) accounts the phases "conv" (crop,
    warp, conv layers) and "pool" (SPP of each crop's whole conv5 map). Call under ``torch.inference_mode()``
    with the backbone in eval mode for inference speed.
    """
    phase = timer or _no_timer
    device = next(backbone.parameters()).device
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pyramid = tuple(int(n) for n in pyramid)
    out = torch.empty((len(boxes), spp.spp_dim(spec.channels, pyramid)), dtype=torch.float32, device=device)
    with phase("conv"):
        pixels = _pixels(image, spec, device)
    for start in range(0, len(boxes), max(1, int(batch))):
        chunk = boxes[start:start + max(1, int(batch))]
        with phase("conv"):
            conv5 = nets.conv5_maps(backbone, warp_windows(pixels, chunk, input_size, context), memory_format)
        with phase("pool"):
            out[start:start + len(chunk)] = spp.spp_pool_full(conv5, pyramid).float()
    return out


def rcnn_window_features(backbone: torch.nn.Module, head: nets.SppHead, image, boxes, spec: nets.BackboneSpec,
                         pyramid: Sequence[int] = spp.DEFAULT_PYRAMID, input_size: int = RCNN_INPUT_SIZE,
                         context: int = RCNN_CONTEXT, batch: int = RCNN_BATCH, layer: str = "fc7",
                         fc_batch: int = 4096, timer: Timer | None = None,
                         memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """R-CNN-mode window features [N, D] float32: ``rcnn_window_pooled`` then ``head.features(.., layer)``
    ("pool5" | "fc6" | "fc7", post-ReLU, no dropout) ``fc_batch`` windows at a time (timer phase "fc")."""
    if layer not in ("pool5", "fc6", "fc7"):
        raise ValueError(f"unknown feature layer {layer!r} (known: pool5, fc6, fc7)")
    pooled = rcnn_window_pooled(backbone, image, boxes, spec, pyramid, input_size, context, batch, timer,
                                memory_format)
    if layer == "pool5":
        return pooled
    phase = timer or _no_timer
    with phase("fc"):  # detect's fc path: each head's input type, batches, float32 out, empty input too
        return head_rows(head, pooled, layer, fc_batch)
