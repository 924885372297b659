"""``spp``: one thin click command per pipeline stage. Parsing and printing only; the work is in ``stages``."""
from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

import click

from stages.core.config import CHOICES
from stages.core.errors import SppError, disk_full_message
from stages.core.registry import CONV_SOURCES, FEATURES, SCORERS


def _run_options(func):
    """Options every stage shares: which run, which config, which dataset, which device."""
    options = [
        click.option("--run", "run_name", default=None, help="Run name: the run lives in <runs-root>/<run>. [default]"),
        click.option("--runs-root", default=None, type=click.Path(file_okay=False), help="[data/runs]"),
        click.option("--config", "preset", default=None,
                     help="Preset name in configs/ (synth, voc2007-zf5, voc2007-mobilenet) or a TOML path."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override one config key, e.g. --set finetune.iters=500 (TOML value syntax)."),
        click.option("--dataset", type=click.Choice(["synth", "voc2007"]), default=None),
        click.option("--voc-root", default=None, type=click.Path(file_okay=False),
                     help="Folder holding VOC2007/ (default data/synth, or $SPP_VOC_ROOT / data/VOCdevkit)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None),
        click.option("--seed", type=int, default=None),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _conv_from_option(func):
    return click.option("--conv-from", type=click.Choice(CONV_SOURCES), default="pretrain",
                        show_default=True,
                        help="Whose conv layers make the conv5 maps: the pretrained ones, or those of a model "
                             "fine-tuned with `spp finetune --conv` (for its ftfc6/ftfc7 SVMs, boxes, detections)."
                        )(func)


_PLACE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _errors_as_one_line(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SppError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
            sys.exit(130)
        except (OSError, RuntimeError) as err:
            message = disk_full_message(err)
            if message is not None:
                click.echo(f"error: {message}", err=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)  # HDF5 can crash closing a file whose write failed: skip the interpreter's clean-up
            if isinstance(err, OSError) and err.filename and err.errno in _PLACE_ERRNOS:
                # an output path the user named (--out, --json) that cannot be written: one line naming it
                from stages.core.runner import unusable_reason
                click.echo(f"error: {err.filename}: cannot write here ({unusable_reason(err)})", err=True)
                sys.exit(1)
            raise
    return wrapper


def _config(run_name, runs_root, preset, sets, dataset, voc_root, device, seed, extra: dict | None = None):
    from stages.core.runconfig import resolve_config

    overrides = {"run": run_name, "runs_root": runs_root, "data.dataset": dataset, "data.voc_root": voc_root,
                 "device": device, "seed": seed}
    overrides.update(extra or {})
    return resolve_config(preset, overrides, sets)


def _report(result) -> None:
    if result.skipped:
        click.echo(f"up to date: {result.manifest.path}")
    if result.summary:
        click.echo(result.summary)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sppnet")
def cli() -> None:
    """SPP-net object detection, stage by stage.

    \b
    pretrain -> proposals -> extract-features -> finetune -> train-svm -> train-bbox -> detect -> eval
    Every stage reads the previous stages' artifacts from <runs-root>/<run>/ and writes its own folder there.
    """


# -- datasets ---------------------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Datasets: generate the embedded default; cut a classification set from a detection split."""


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False), default="data/synth", show_default=True,
              help="VOCdevkit folder to write (VOC2007/ and classification/ inside).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--images", type=int, default=None, help="Detection images over all splits.  [default: 480]")
@click.option("--crops-per-class", type=int, default=None,
              help="Classification train images per class (val gets a quarter).  [default: 1000]")
@_errors_as_one_line
def data_synth(out, seed, images, crops_per_class):
    """Generate the embedded default dataset (VOC2007 layout + a classification set), deterministic per seed."""
    from stages import synth

    summary = synth.generate(Path(out), seed=seed, images=synth.DEFAULT_IMAGES if images is None else images,
                             crops_per_class=crops_per_class)
    click.echo(summary)


@data.command("crops")
@click.option("--dataset", type=click.Choice(["synth", "voc2007"]), default="voc2007", show_default=True)
@click.option("--voc-root", default=None, type=click.Path(file_okay=False),
              help="Folder holding VOC2007/ (default data/synth, or $SPP_VOC_ROOT / data/VOCdevkit).")
@click.option("--split", default="train", show_default=True, help="Detection split whose objects are cut out.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="ImageFolder tree to write (train/<class>/*.jpg, val/<class>/*.jpg, CROPS.json).")
@click.option("--context", type=float, default=0.1, show_default=True,
              help="Grow each box by this fraction of its width/height on every side.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Fraction of the split's images (not crops) whose crops go to val/.")
@click.option("--short-side", type=int, default=96, show_default=True, help="Crop shorter side after resizing, px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val division of images.")
@_errors_as_one_line
def data_crops(dataset, voc_root, split, out, context, val_fraction, short_side, seed):
    """Ground-truth object crops (non-difficult, with context) of a split as an ImageFolder set for pretrain."""
    from stages import crops

    click.echo(crops.write_crops(Path(out), dataset=dataset, voc_root=voc_root, split=split, context=context,
                                 val_fraction=val_fraction, seed=seed, short_side=short_side))


# -- stages -----------------------------------------------------------------------------------------------------
@cli.command()
@_run_options
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="ImageFolder tree (train/<class>/*.jpg, val/<class>/*.jpg); default: the synth classification set.")
@click.option("--epochs", type=int, default=None)
@click.option("--init", default=None, type=click.Path(dir_okay=False), help="Start from this local weights file.")
@_errors_as_one_line
def pretrain(data_dir, epochs, init, **common):
    """Classification pretraining of backbone + SPP + fc6/fc7/fc8, multi-size (torchrun-ready)."""
    from stages import pretrain as stage

    cfg = _config(**common, extra={"pretrain.data": data_dir, "pretrain.epochs": epochs, "pretrain.init": init})
    _report(stage.run(cfg))


@cli.command()
@_run_options
@click.option("--split", required=True, help="Image set, e.g. trainval or test.")
@click.option("--boxes-file", default=None, type=click.Path(dir_okay=False),
              help="Use precomputed proposals (.h5 with boxes/<id>, or .npz / .mat-like {id: [N,4] x1y1x2y2 1-based}).")
@click.option("--workers", type=int, default=None, help="Processes (0 = all cores).")
@_errors_as_one_line
def proposals(split, boxes_file, workers, **common):
    """Selective search (fast mode) per image, cached in HDF5, resumable; reports recall@0.5/0.7."""
    from stages import proposals as stage

    cfg = _config(**common, extra={"proposals.workers": workers})
    _report(stage.run(cfg, split, boxes_file=Path(boxes_file) if boxes_file else None))


@cli.command("extract-features")
@_run_options
@click.option("--split", required=True)
@click.option("--scales", default=None, help="Comma-separated shorter sides, e.g. 688 or 480,576,688,874,1200.")
@_conv_from_option
@_errors_as_one_line
def extract_features(split, scales, conv_from, **common):
    """conv5 maps of every image at every scale into HDF5 (float16, chunked), resumable, torchrun-sharded."""
    from stages import extract_features as stage

    extra = {"features.scales": [int(s) for s in scales.split(",")] if scales else None}
    cfg = _config(**common, extra=extra)
    _report(stage.run(cfg, split, conv_from=conv_from))


@cli.command()
@_run_options
@click.option("--iters", type=int, default=None)
@click.option("--conv/--no-conv", default=None, help="Also fine-tune the conv layers through SPP (beyond the paper).")
@_errors_as_one_line
def finetune(iters, conv, **common):
    """Fine-tune fc6, fc7 and a new (N+1)-way fc8 on SPP-pooled windows from the conv5 cache."""
    from stages import finetune as stage

    cfg = _config(**common, extra={"finetune.iters": iters, "finetune.conv": conv})
    _report(stage.run(cfg))


def _variant_options(func=None, *, scorers: bool = False):
    """--feature and --one-scale; with ``scorers``, --feature also takes ``softmax`` (detect, eval)."""
    if func is None:
        return functools.partial(_variant_options, scorers=scorers)
    func = click.option("--one-scale", is_flag=True, help="Use only features.one_scale (the paper's 1-scale rows).")(func)
    help_text = "Features the SVMs use: pool5 (pooled conv5), fc6/fc7 (pretrained), ftfc6/ftfc7."
    if scorers:
        help_text += " softmax: the fine-tuned fc8's class probabilities, no SVMs."
    func = click.option("--feature", type=click.Choice(SCORERS if scorers else FEATURES), default="ftfc7",
                        show_default=True, help=help_text)(func)
    return func


@cli.command("train-svm")
@_run_options
@_variant_options
@_errors_as_one_line
def train_svm(feature, one_scale, **common):
    """Per-class linear SVMs with hard-negative mining (liblinear settings of the released code)."""
    from stages import train_svm as stage

    cfg = _config(**common)
    _report(stage.run(cfg, feature=feature, one_scale=one_scale))


@cli.command("train-bbox")
@_run_options
@click.option("--one-scale", is_flag=True)
@_conv_from_option
@_errors_as_one_line
def train_bbox(one_scale, conv_from, **common):
    """Per-class ridge box regressors on pooled conv5 features (R-CNN targets)."""
    from stages import train_bbox as stage

    cfg = _config(**common)
    _report(stage.run(cfg, one_scale=one_scale, conv_from=conv_from))


@cli.command()
@click.argument("paths", nargs=-1, metavar="[PATHS]...")
@_run_options
@_variant_options(scorers=True)
@click.option("--split", default=None, help="Image set to detect on [data.test_split].")
@click.option("--bbox/--no-bbox", default=None, help="Apply box regression [detect.bbox].")
@click.option("--images", "image_options", multiple=True, metavar="PATH",
              help="Detect on your own images instead of a split: an image file, a folder (its jpg, jpeg, png, "
                   "bmp, tif, tiff, webp files) or a glob pattern such as 'photos/**/*.jpg' (quote it). Repeatable; "
                   "any further PATHS count too (--images a.jpg b.jpg), after the --images values.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="With images: the folder for <id>_detections.jpg and detections.json.")
@click.option("--score-thresh", type=float, default=None,
              help="With images: keep detections scoring above this.  [default: 0.0 for SVM scores (their "
                   "decision boundary), 0.5 for --feature softmax (a probability)]")
@click.option("--skip-bad", is_flag=True, default=False,
              help="With images: skip an unreadable, corrupt or non-image file with a one-line warning (also "
                   "--set data.skip_bad=true) instead of stopping at it.")
@click.option("--comp4", "comp4_name", default=None, metavar="NAME",
              help="With images: also write devkit files comp4_det_NAME_<class>.txt (1-based inclusive boxes, "
                   "image ids as in detections.json), e.g. --comp4 test for `spp eval --detections OUT --split "
                   "test`; pair it with a low --score-thresh such as -1.5 for AP.")
@_errors_as_one_line
def detect(paths, feature, one_scale, split, bbox, image_options, out, score_thresh, skip_bad, comp4_name, **common):
    """Score every proposal, per-class NMS, optional box regression; writes devkit comp4 files.

    Or, with --images (or PATHS), detect on your own images with the run's trained models; nothing is written
    to the run then.

    \b
      spp detect --run R --one-scale --images photos/ 'more/*.png' x.jpg --out drawn/
    \b
    OUT/<id>_detections.jpg  each image drawn (<id>: its file stem, made unique with _2, _3, ...)
    OUT/detections.json      {"format", "box_convention", "run", "feature", "classes", "score_thresh", ...,
                              "complete", "images": [{"image", "id", "drawn", "width", "height",
                              "detections": [{"class", "score", "box": [x1, y1, x2, y2]}]}], "skipped"}
    Boxes are float pixel coordinates, 0-based from the image's top-left corner (EXIF orientation applied),
    x1/y1 inclusive and x2/y2 exclusive (width = x2 - x1), highest score first.
    """
    images = [*image_options, *paths]
    if not images:
        given = [name for name, value in (("--out", out), ("--score-thresh", score_thresh),
                                          ("--skip-bad", skip_bad or None), ("--comp4", comp4_name))
                 if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --images")
        from stages import detect as stage

        cfg = _config(**common, extra={"detect.bbox": bbox})
        _report(stage.run(cfg, split or cfg.data.test_split, feature=feature, one_scale=one_scale))
        return
    if split:
        raise click.UsageError("--split and --images (or PATHS) cannot go together: detect on a split or on images")
    if not out:
        raise click.UsageError("--images needs --out DIR")
    from stages.detector import Detector, detect_images

    cfg = _config(**common, extra={"detect.bbox": bbox})
    detector = Detector(cfg, feature=feature, bbox=cfg.detect.bbox, one_scale=one_scale, score_thresh=score_thresh)
    _report(detect_images(detector, images, Path(out), comp4=comp4_name, skip_bad=skip_bad or cfg.data.skip_bad))


@cli.command("eval")
@_run_options
@_variant_options(scorers=True)
@click.option("--split", default=None, help="Image set [data.test_split].")
@click.option("--bbox/--no-bbox", default=None)
@click.option("--detections", default=None, type=click.Path(file_okay=False),
              help="Folder of comp4_det_<split>_<class>.txt files to score (instead of the run's own).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where metrics.json and the PR plot go.")
@click.option("--metric", type=click.Choice(["voc07", "area"]), default="voc07", show_default=True,
              help="voc07: 11-point (VOCevaldet.m 2007); area: VOC2010+ area under the PR curve.")
@_errors_as_one_line
def eval_(feature, one_scale, split, bbox, detections, out, metric, **common):
    """VOC detection AP exactly as the 2007 devkit computes it; per-class table, metrics.json, PR plot."""
    from stages import evaluate as stage

    cfg = _config(**common, extra={"detect.bbox": bbox})
    split = split or cfg.data.test_split
    if detections:
        if not out:
            raise click.UsageError("--detections needs --out DIR")
        _report(stage.evaluate_folder(cfg, split, Path(detections), Path(out), metric=metric))
    else:
        _report(stage.run(cfg, split, feature=feature, one_scale=one_scale, metric=metric,
                          out=Path(out) if out else None))


@cli.command()
@_run_options
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the rows (mAP and per-class AP of each variant) to this JSON file.")
@_errors_as_one_line
def table9(json_out, **common):
    """Print the paper's Table 9 rows for this run (from its eval results); reads the run, writes nothing there."""
    from stages import report

    cfg = _config(**common)
    click.echo(report.table9(cfg, json_out=Path(json_out) if json_out else None))


@cli.command()
@_run_options
@click.option("--backbone", default=None, type=click.Choice(CHOICES["model.backbone"]),
              help="Trunk to time (default: the run's model.backbone).")
@click.option("--images", "n_images", type=int, default=3, show_default=True)
@click.option("--windows", type=int, default=2000, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--fc-dtype", type=click.Choice(CHOICES["detect.fc_dtype"]), default="float32", show_default=True,
              help="fc6/fc7 precision in every mode (bfloat16: ~2x on CPUs with AVX512-BF16/AMX and on GPUs).")
@click.option("--threads", type=int, default=None, help="CPU threads for the kernels [default: all cores].")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: process CPU time (with --threads 1, for a machine shared with other jobs).")
@_errors_as_one_line
def bench(backbone, n_images, windows, repeats, json_out, fc_dtype, threads, clock, **common):
    """Time R-CNN mode vs SPP 1-scale vs SPP 5-scale per image (conv, pool, fc), with FLOP rates."""
    from stages import bench as stage

    cfg = _config(**common, extra={"model.backbone": backbone})
    click.echo(stage.run(cfg, n_images=n_images, windows=windows, repeats=repeats,
                         json_out=Path(json_out) if json_out else None, fc_dtype=fc_dtype, threads=threads,
                         clock=clock))


def main() -> None:
    cli(prog_name="spp")


if __name__ == "__main__":
    main()
