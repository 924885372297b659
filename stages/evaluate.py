"""``spp eval``: VOC detection AP of devkit comp4 files, exactly as the 2007 devkit computes it (SPEC §7).

Two entry points:
- ``run``: the run's own detections (``06_detect/<tag>/``) -> ``07_eval/<tag>/`` with a manifest that records
  the detect manifest and the dataset split's fingerprint. ``metric="area"`` goes to ``07_eval/<tag>-area/`` so
  that it never replaces the VOC07 numbers that ``spp table9`` reads.
- ``evaluate_folder``: any folder of ``comp4_det_<split>_<class>.txt`` files -> any output folder (no run
  directory needed); its manifest records the comp4 files' hashes instead.

Outputs: ``metrics.json`` (mAP, per-class AP and npos), ``pr_curves.png`` and ``MANIFEST.json`` (written last).
Every class of the dataset is evaluated; a missing comp4 file means no detections (AP 0), and files of other
classes are ignored, as in the devkit. A detection on an image outside the split is an error naming its file.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from .core.ap import DEVKIT_MIN_OVERLAP, METRICS, evaluate_detections
from .core.artifacts import (MANIFEST_NAME, Run, StageResult, atomic_write_bytes, atomic_write_json, read_manifest,
                             sha256_file)
from .core.errors import InputError, SppError
from .core.registry import detect_tag
from .core.runner import Produced, StagePlan, execute
from .core.voc import Detections, VocDataset, comp4_path, read_comp4

EVAL_CONFIG_VERSION = 1  # bump when the evaluation itself changes, so old results are not reused


def run(cfg, split: str, feature: str = "ftfc7", one_scale: bool = False, metric: str = "voc07",
        out: Path | None = None) -> StageResult:
    """Evaluate the run's detections of one Table 9 variant on ``split``."""
    _check_metric(metric)
    run_dir = Run(cfg.run_dir)
    tag = detect_tag(split, feature, one_scale, len(cfg.features.scales), cfg.detect.bbox)
    detect_manifest = run_dir.require("detect", tag)
    comp4_dir = detect_manifest.output("comp4_dir")
    dataset = _dataset(cfg)
    config = _eval_config(cfg, split, metric)
    inputs = {"dataset": dataset.fingerprint(split), "detections": _comp4_hashes(comp4_dir, split, dataset.classes)}
    eval_tag = tag if metric == "voc07" else f"{tag}-{metric}"
    inputs["detect"] = detect_manifest
    return _evaluate_into(run_dir, eval_tag, config, inputs, dataset, split, comp4_dir, metric,
                          Path(out) if out is not None else None, plot_name=tag)


def evaluate_folder(cfg, split: str, detections_dir: Path, out_dir: Path, metric: str = "voc07") -> StageResult:
    """Evaluate ``detections_dir/comp4_det_<split>_<class>.txt`` against the dataset's split into ``out_dir``."""
    _check_metric(metric)
    detections_dir = Path(detections_dir)
    if not detections_dir.is_dir():
        raise InputError("no such detections folder", detections_dir)
    dataset = _dataset(cfg)
    hashes = _comp4_hashes(detections_dir, split, dataset.classes)
    if not any(hashes.values()):
        have = sorted(p.name for p in detections_dir.glob("comp4_det_*.txt"))[:3]
        raise InputError(f"no comp4_det_{split}_<class>.txt file for any of the {len(hashes)} classes (found: "
                         f"{', '.join(have) + ' ...' if have else 'none'}); wrong folder or --split?", detections_dir)
    inputs = {"dataset": dataset.fingerprint(split), "detections": hashes}
    # An outside folder, not a run: the runner gets a run rooted there and the folder itself.
    return _evaluate_into(Run(Path(out_dir)), None, _eval_config(cfg, split, metric), inputs, dataset,
                          split, detections_dir, metric, Path(out_dir),
                          plot_name=f"{detections_dir.resolve().name} ({split})")


def _evaluate_into(run: Run, tag: str | None, config: dict, inputs: dict, dataset: VocDataset, split: str,
                   comp4_dir: Path, metric: str, folder: Path | None = None, plot_name: str | None = None
                   ) -> StageResult:
    """``folder``: write there instead of the run's eval folder (``--out``). ``plot_name`` titles the PR plot:
    the variant's tag (``test-ftfc7-s5-bb``), or the detections folder and split."""
    plan = StagePlan("eval", tag, config, inputs, {"metrics": "metrics.json", "pr_curves": "pr_curves.png"},
                     folder=folder)
    if folder is not None:
        _refuse_foreign_manifest(Path(folder) / MANIFEST_NAME)

    def evaluate(out: Path) -> Produced:
        result, num_images, skipped_images = _evaluate(dataset, split, Path(comp4_dir), metric)
        metrics = {"mAP": result["mAP"], "ap": result["ap"], "metric": metric, "split": split,
                   "num_images": num_images, "npos": result["npos"], "num_detections": result["num_detections"]}
        if skipped_images:
            metrics["skipped_images"] = skipped_images
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_bytes(out / "pr_curves.png", _pr_plot(result, plot_name or tag or split, metric))
        return Produced(metrics, summary=f"written: {out / 'metrics.json'}", extra={"result": result})

    return execute(run, plan, evaluate, describe=_table_from_metrics)


def _evaluate(dataset: VocDataset, split: str, comp4_dir: Path, metric: str) -> tuple[dict, int, list[str]]:
    """Read the split's annotations and every class's comp4 file, and compute the APs."""
    split_ids = dataset.image_ids(split)
    annotations = dataset.annotations(split)  # with data.skip_bad, a bad annotation is warned about and left out
    usable = {a.image_id for a in annotations}
    skipped = [i for i in split_ids if i not in usable]
    skipped_set = set(skipped)
    per_class, sources = {}, {}
    for name in dataset.classes:
        path = sources[name] = comp4_path(comp4_dir, split, name)
        dets = read_comp4(path)
        if skipped:  # detections on a skipped image cannot be judged: leave them out, loudly
            keep = np.array([i not in skipped_set for i in dets.image_ids], dtype=bool)
            if not keep.all():
                warnings.warn(f"{path}: leaving out {np.count_nonzero(~keep)} detection(s) on images skipped for "
                              "bad annotations", stacklevel=2)
                dets = Detections([i for i, k in zip(dets.image_ids, keep) if k], dets.scores[keep], dets.boxes[keep])
        per_class[name] = dets
    result = evaluate_detections(annotations, dataset.classes, per_class, metric=metric, sources=sources)
    for name, ap in result["ap"].items():
        if np.isnan(ap):
            warnings.warn(f"class {name!r}: AP is NaN, as in the devkit: every detection hit a difficult box",
                          stacklevel=2)
    return result, len(annotations), skipped


def _refuse_foreign_manifest(path: Path) -> None:
    """An output folder that holds another stage's manifest (say ``--out`` pointed at a detect folder) is not
    ours to invalidate: stop before touching it."""
    try:
        stage = read_manifest(path).data.get("stage")
    except FileNotFoundError:
        return
    except SppError:
        stage = "not an sppnet eval"
    if stage != "eval":
        raise SppError(f"this folder holds the manifest of another stage ({stage}); choose another --out", path)


def _comp4_hashes(folder: Path, split: str, classes) -> dict[str, str | None]:
    """sha256 of each class's comp4 file (None: no file), so edited or regenerated detections are re-scored."""
    paths = {name: comp4_path(folder, split, name) for name in classes}
    return {name: sha256_file(path) if path.exists() else None for name, path in paths.items()}


def _dataset(cfg) -> VocDataset:
    return VocDataset.from_config(cfg.data)


def _eval_config(cfg, split: str, metric: str) -> dict:
    """What the result depends on besides its inputs' fingerprints (the ground truth is fingerprinted too)."""
    data = {key: cfg.section("data")[key] for key in ("dataset", "voc_root", "skip_bad")}
    return {"data": data, "eval": {"split": split, "metric": metric, "min_overlap": DEVKIT_MIN_OVERLAP,
                                   "version": EVAL_CONFIG_VERSION}}


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SppError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")


def _table_from_metrics(metrics: dict) -> str:
    """The per-class table: AP (%), non-difficult GT count and number of detections, then the mean."""
    name_width = max([len(n) for n in metrics["ap"]] + [5])
    lines = [f"{metrics.get('metric', 'voc07')} AP on {metrics.get('split', '?')} "
             f"({metrics.get('num_images', '?')} images)",
             f"{'class':<{name_width}}  {'AP':>6}  {'npos':>6}  {'dets':>7}"]
    for name, ap in metrics["ap"].items():
        lines.append(f"{name:<{name_width}}  {ap * 100:>6.2f}  {metrics['npos'].get(name, 0):>6d}  "
                     f"{metrics.get('num_detections', {}).get(name, 0):>7d}")
    lines.append(f"{'mAP':<{name_width}}  {metrics['mAP'] * 100:>6.2f}")
    return "\n".join(lines)


PLOT_DPI = 120  # PR plot resolution: readable when opened at full size (72 dpi was blurry)


def pr_plot_title(name: str, metric: str, mean_ap: float) -> str:
    """The PR plot's title: what was evaluated (a variant tag such as ``test-ftfc7-s5-bb``), the metric and mAP."""
    return f"{name}: {metric} mAP {mean_ap * 100:.1f}"


def _pr_plot(result: dict, name: str, metric: str) -> bytes:
    """One precision/recall panel per class (Agg canvas, no global matplotlib state), as PNG bytes, titled with
    ``name`` (the variant's tag)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["curves"])
    cols = min(5, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.2 * rows + 0.5), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, class_name in zip(axes, names):
        curve = result["curves"][class_name]
        if len(curve["recall"]) and result["npos"][class_name]:
            ax.plot(curve["recall"], curve["precision"], lw=1, clip_on=False,
                    marker="." if len(curve["recall"]) < 50 else None)
        ax.set_title(f"{class_name}: AP {result['ap'][class_name] * 100:.1f}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_xticks([0, 0.5, 1], ["0", ".5", "1"])  # few fixed ticks: their cost dominates drawing time
    axes[0].set_yticks([0, 0.5, 1], ["0", ".5", "1"])
    for ax in axes.reshape(rows, cols)[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes.reshape(rows, cols)[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    fig.suptitle(pr_plot_title(name, metric, result["mAP"]), fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.12, hspace=0.35)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
