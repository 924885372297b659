"""The box-regression model of ``spp train-bbox``, as ``bbox.npz`` holds it: one save (``save_bbox_model``), one
load (``load_bbox_model``), one apply (``apply_bbox``; ``predict_deltas`` is its regression step).

Prediction [S:bbox_regression/spp_predict_bbox_regressor.m]: pool5 features scaled by ``feature_scale``, then
``Y = (X beta) T^{-1} + mu`` (``beta`` with a bias row, ``T`` the targets' whitening), then
``boxes.apply_bbox_deltas`` and a clip to the image. A class without training samples has the identity regressor
(zero deltas): its boxes are left as they are.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import boxes as box_ops
from .artifacts import atomic_write_bytes
from .errors import SppError
from .registry import command_for_path


@dataclass(frozen=True)
class BboxModel:
    """Per-class regressors: ``beta[k]`` [D+1, 4] (last row: bias), whitening ``mu[k]``, ``T[k]``, ``T_inv[k]``."""

    beta: np.ndarray  # float64 [K, D+1, 4]
    mu: np.ndarray  # float64 [K, 4]
    T: np.ndarray  # float64 [K, 4, 4]
    T_inv: np.ndarray  # float64 [K, 4, 4]
    feature_scale: float  # pool5 features are multiplied by this (20 / mean norm) before regression
    mean_norm: float
    samples: np.ndarray  # int64 [K]: training samples; 0 -> identity regressor (boxes are left as they are)
    classes: tuple[str, ...]
    scales: tuple[int, ...]
    pyramid: tuple[int, ...]
    lam: float
    min_iou: float


def save_bbox_model(path: Path, model: BboxModel) -> None:
    """Write ``model`` to ``path`` (``bbox.npz``) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, beta=model.beta, mu=model.mu, T=model.T, T_inv=model.T_inv, samples=model.samples,
             feature_scale=np.float64(model.feature_scale), mean_norm=np.float64(model.mean_norm),
             classes=np.array(model.classes, dtype=str), scales=np.array(model.scales, dtype=np.int64),
             pyramid=np.array(model.pyramid, dtype=np.int64), lam=np.float64(model.lam),
             min_iou=np.float64(model.min_iou), feature=np.array("pool5"))
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_bbox_model(path: Path) -> BboxModel:
    """The model ``save_bbox_model`` wrote (a one-line SppError naming the file and the command otherwise)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return BboxModel(beta=np.asarray(data["beta"], np.float64), mu=np.asarray(data["mu"], np.float64),
                             T=np.asarray(data["T"], np.float64), T_inv=np.asarray(data["T_inv"], np.float64),
                             feature_scale=float(data["feature_scale"]), mean_norm=float(data["mean_norm"]),
                             samples=np.asarray(data["samples"], np.int64),
                             classes=tuple(str(c) for c in data["classes"]),
                             scales=tuple(int(s) for s in data["scales"]),
                             pyramid=tuple(int(n) for n in data["pyramid"]),
                             lam=float(data["lam"]), min_iou=float(data["min_iou"]))
    except (OSError, KeyError, ValueError) as exc:
        raise SppError(f"unreadable box-regression file ({type(exc).__name__}: {exc}); rerun `{command_for_path(Path(path))}`",
                       path) from None


def predict_deltas(model: BboxModel, class_index: int, features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Regression targets [N, 4] for raw (unscaled) pool5 ``features`` [N, D]: ``(X beta) T^{-1} + mu``."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    X = np.asarray(features, dtype=np.float64) * model.feature_scale
    beta = model.beta[class_index]
    if X.ndim != 2 or X.shape[1] != beta.shape[0] - 1:
        raise ValueError(f"features of shape {X.shape} for a regressor of {beta.shape[0] - 1} inputs")
    whitened = X @ beta[:-1] + beta[-1]
    return whitened @ model.T_inv[class_index] + model.mu[class_index]


def apply_bbox(model: BboxModel, class_index: int, features: np.ndarray | torch.Tensor, boxes: np.ndarray,
               image_wh: tuple[int, int]) -> np.ndarray:
    """Regressed boxes of class ``class_index``: ``features`` are the windows' raw pool5 features (as
    ``fcfeatures.window_features(..., "pool5")`` returns them; scaled here), ``boxes`` [N, 4] in sppnet's
    convention, ``image_wh`` = (W, H); the result is clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes.copy()
    deltas = predict_deltas(model, class_index, features)
    return box_ops.clip_boxes(box_ops.apply_bbox_deltas(boxes, deltas), int(image_wh[0]), int(image_wh[1]))
