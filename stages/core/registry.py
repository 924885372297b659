"""The one registry of stages: each stage's name, command, config section, folder and how its variants are tagged.

Everything that names a stage (the run directory's folders, manifests, "run X first" messages, the Makefile's
targets, which is checked against this table by a test) takes it from here. A tag names one output of a stage
that has several: a split (``trainval``), or a variant (``ftfc7-s5``, ``test-ftfc7-s5-bb``); ``command_line``
turns a (stage, tag) back into the command that makes it, ready to paste.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

FEATURES = ("pool5", "fc6", "fc7", "ftfc6", "ftfc7")  # what the SVMs can use (Table 9's rows)
# What detect can score windows with: an SVM variant's feature, or "softmax": the fine-tuned net's own fc8
# softmax, no SVMs (Fast R-CNN found it as good as SVMs; beyond the paper's Table 9).
SCORERS = FEATURES + ("softmax",)
CONV_SOURCES = ("pretrain", "finetune")  # whose conv layers make the conv5 maps
# Tag suffix of what was computed from the conv layers of a model fine-tuned with ``spp finetune --conv``
# (``02_features/<split>+ftconv``, ``05_bbox/s<n>+ftconv``); without it, from the pretrained conv layers.
FINETUNED_CONV_SUFFIX = "+ftconv"
DEFAULT_RUNS_ROOT = "data/runs"


@dataclass(frozen=True)
class StageInfo:
    name: str  # the stage's name in manifests and in ``Run.require``
    command: str  # ``spp <command>``
    module: str  # ``stages.<module>`` holds its ``run``
    section: str | None  # the config section it is tuned by (``--set <section>.<key>=...``)
    folder: str  # its folder in the run directory; the number orders the pipeline
    tagged_by: str  # "" (one output per run), "split" or "variant"


STAGES: dict[str, StageInfo] = {info.name: info for info in (
    StageInfo("pretrain", "pretrain", "pretrain", "pretrain", "00_pretrain", ""),
    StageInfo("proposals", "proposals", "proposals", "proposals", "01_proposals", "split"),
    StageInfo("features", "extract-features", "extract_features", "features", "02_features", "split"),
    StageInfo("finetune", "finetune", "finetune", "finetune", "03_finetune", ""),
    StageInfo("svm", "train-svm", "train_svm", "svm", "04_svm", "variant"),
    StageInfo("bbox", "train-bbox", "train_bbox", "bbox", "05_bbox", "variant"),
    StageInfo("detect", "detect", "detect", "detect", "06_detect", "variant"),
    StageInfo("eval", "eval", "evaluate", None, "07_eval", "variant"),
)}


def stage(name: str) -> StageInfo:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(STAGES)})") from None


# -- tags ---------------------------------------------------------------------------------------------------------
def conv_suffix(conv_from: str) -> str:
    """The tag suffix for conv5 maps (and what is computed from them) made by ``conv_from``'s conv layers."""
    if conv_from not in CONV_SOURCES:
        from .errors import SppError
        raise SppError(f"conv5 maps come from 'pretrain' or 'finetune', not {conv_from!r}")
    return FINETUNED_CONV_SUFFIX if conv_from == "finetune" else ""


def features_tag(split: str, conv_from: str = "pretrain") -> str:
    """Folder tag of an extract-features run: the split, ``+ftconv`` for the conv layers of ``finetune --conv``."""
    return split + conv_suffix(conv_from)


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
    """Folder tag of a detect/eval run, e.g. ``test-ftfc7-s5-bb`` (``test-softmax-s1``: fc8 softmax scores)."""
    if feature not in SCORERS:
        raise ValueError(f"unknown scorer {feature!r} (known: {', '.join(SCORERS)})")
    return f"{split}-{feature}-{scale_tag(one_scale, n_scales)}{'-bb' if bbox else ''}"


_FEATURE = "|".join(FEATURES)
_SVM_TAG = re.compile(rf"(?P<feature>{_FEATURE})-s(?P<n>\d+)")
_BBOX_TAG = re.compile(rf"s(?P<n>\d+)(?P<ft>{re.escape(FINETUNED_CONV_SUFFIX)})?")
_DETECT_TAG = re.compile(rf"(?P<split>.+)-(?P<feature>{'|'.join(SCORERS)})-s(?P<n>\d+)(?P<bb>-bb)?")


def command_args(name: str, tag: str | None = None) -> list[str]:
    """The options of ``spp <command>`` that make stage ``name``'s output ``tag`` (inverse of the tag builders)."""
    info = stage(name)
    if not info.tagged_by or not tag:
        return []
    if name in ("proposals", "features"):
        split, ft = (tag[:-len(FINETUNED_CONV_SUFFIX)], True) if tag.endswith(FINETUNED_CONV_SUFFIX) else (tag, False)
        return ["--split", split] + (["--conv-from", "finetune"] if ft else [])
    if name == "svm" and (m := _SVM_TAG.fullmatch(tag)):
        return ["--feature", m["feature"]] + (["--one-scale"] if m["n"] == "1" else [])
    if name == "bbox" and (m := _BBOX_TAG.fullmatch(tag)):
        return (["--one-scale"] if m["n"] == "1" else []) + (["--conv-from", "finetune"] if m["ft"] else [])
    if name in ("detect", "eval") and (m := _DETECT_TAG.fullmatch(tag)):
        return (["--split", m["split"], "--feature", m["feature"]] + (["--one-scale"] if m["n"] == "1" else [])
                + ["--bbox" if m["bb"] else "--no-bbox"])
    raise ValueError(f"{tag!r} is not a tag of stage {name!r}")


def command_line(run_dir: Path, name: str, tag: str | None = None) -> str:
    """The command that (re)makes stage ``name``'s output ``tag`` of the run at ``run_dir``, ready to paste."""
    run_dir = Path(run_dir)
    args = ["spp", stage(name).command, "--run", run_dir.name]
    if run_dir.parent.resolve() != Path(DEFAULT_RUNS_ROOT).resolve():
        args += ["--runs-root", str(run_dir.parent)]
    return shlex.join(args + command_args(name, tag))


def command_for_path(path: Path) -> str:
    """The command that remakes the artifact at ``path`` (a file inside ``<run>/<NN_stage>/[<tag>/]``), ready to
    paste; for a file outside a run's layout, the bare ``spp <command>`` of the stage named by its folder."""
    path = Path(path)
    by_folder = {info.folder: info for info in STAGES.values()}
    for folder in path.parents:
        info = by_folder.get(folder.name)
        if info is None:
            continue
        tag = None
        if info.tagged_by:
            inside = path.relative_to(folder).parts
            tag = inside[0] if len(inside) > 1 else None
        try:
            return command_line(folder.parent, info.name, tag)
        except ValueError:
            return f"spp {info.command}"
    return "spp"
