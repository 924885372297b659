"""Names of the Table 9 variants: which features the SVMs use and at how many scales."""
from __future__ import annotations

from .artifacts import conv_suffix

FEATURES = ("pool5", "fc6", "fc7", "ftfc6", "ftfc7")


def scale_tag(one_scale: bool, n_scales: int) -> str:
    return "s1" if one_scale else f"s{n_scales}"


def bbox_tag(one_scale: bool, n_scales: int, conv_from: str = "pretrain") -> str:
    """Folder tag of a train-bbox run: ``s5``, or ``s5+ftconv`` on the conv layers of ``spp finetune --conv``."""
    return scale_tag(one_scale, n_scales) + conv_suffix(conv_from)


def svm_tag(feature: str, one_scale: bool, n_scales: int) -> str:
    """Folder tag of a train-svm run, e.g. ``ftfc7-s5``."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")
    return f"{feature}-{scale_tag(one_scale, n_scales)}"


def detect_tag(split: str, feature: str, one_scale: bool, n_scales: int, bbox: bool) -> str:
    """Folder tag of a detect/eval run, e.g. ``test-ftfc7-s5-bb``."""
    return f"{split}-{svm_tag(feature, one_scale, n_scales)}{'-bb' if bbox else ''}"
