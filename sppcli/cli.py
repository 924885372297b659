"""``spp``: one thin click command per pipeline stage. Parsing and printing only; the work is in ``stages``."""
from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from pathlib import Path

import click

from sppcli import STARTED
from stages.core.config import CHOICES, DATASETS, PRESET_DIR
from stages.core.errors import SppError, disk_full_message
from stages.core.registry import CONV_SOURCES, DEFAULT_RUNS_ROOT, FEATURES, SCORERS

log = logging.getLogger(__name__)
PRESETS = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
VOC_ROOT_HELP = ("synth, voc2007: the folder holding VOC2007/ (a VOCdevkit). voc: your VOC-layout folder "
                 "(Annotations/, JPEGImages/, ImageSets/Main/) or a folder holding exactly one. Relative paths are "
                 "from the working directory; the run saves it absolute.")
VOC_ROOT_DEFAULT = ("data/synth for --dataset synth; $SPP_VOC_ROOT, else data/VOCdevkit, for voc2007; "
                    "required for voc")
DATASET_HELP = ("synth: the embedded generated dataset; voc2007: PASCAL VOC 2007 (its 20 classes); voc: your own "
                "VOC-layout folder (--voc-root), classes from its classes.txt or its annotations, any image format "
                "(docs/own-dataset.md).")
FROM_RUN = "the run's saved value, else the preset's"  # options whose default is the run's config


class _Option(click.Option):
    """click's option, a descriptive default (``show_default="..."``) shown as written: ``[default: text]``
    (click itself wraps it in parentheses)."""

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str) and "default" in extra:
            extra["default"] = self.show_default
        return extra


option = functools.partial(click.option, cls=_Option)


def _run_options(func):
    """Options every stage shares: which run, which config, which dataset, which device."""
    options = [
        option("--run", "run_name", default="default", help="Run name: the run lives in <runs-root>/<run>."),
        option("--runs-root", default=DEFAULT_RUNS_ROOT, type=click.Path(file_okay=False),
               help="Folder holding the runs; a relative path is from the working directory (to continue a "
                    "run from another folder, name its runs root). Runs save every path absolute."),
        option("--config", "preset", default=None, show_default="the run's saved config; for a new run synth "
               "(--dataset synth) or voc2007-zf5 (voc2007)",
               help=f"Preset name in stages/configs/ ({PRESETS}) or a TOML path; replaces the run's saved "
                    "config."),
        option("--set", "sets", multiple=True, metavar="KEY=VALUE",
               help="Override one config key, e.g. --set finetune.iters=500 (TOML value syntax); repeatable."),
        option("--dataset", type=click.Choice(DATASETS), default=None,
               show_default=f"{FROM_RUN} (synth)", help=DATASET_HELP),
        option("--voc-root", default=None, type=click.Path(file_okay=False), show_default=VOC_ROOT_DEFAULT,
               help=VOC_ROOT_HELP),
        option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
               show_default="auto: cuda when available", help="Where the networks run (not saved with the run)."),
        option("--seed", type=int, default=None, show_default=f"{FROM_RUN} (0)",
               help="Seed of every random choice; same inputs and seed give the same results on CPU."),
    ]
    for decorator in reversed(options):
        func = decorator(func)
    return func


# -- several processes (torchrun) -----------------------------------------------------------------------------------
ARGV = "spp.argv"  # the command line the root group was given (``ctx.meta``), for --nproc-per-node to re-run it


class _Group(click.Group):
    """click's group, keeping its command line in ``ctx.meta`` (``--nproc-per-node`` re-runs it under torchrun)."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta[ARGV] = argv
        return ctx


class _OneLineBadParameter(click.BadParameter):
    """A usage error (exit status 2) shown as one line, like every other error of spp."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=True)


class _ProcessCount(click.ParamType):
    name = "N"

    def convert(self, value, param, ctx):
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = 0
        if count < 1:
            self.fail(f"{value!r} is not a process count (1 or more)", param, ctx)
        return count

    def fail(self, message, param=None, ctx=None):
        raise _OneLineBadParameter(message, ctx=ctx, param=param)


def _torchrun_epilog(command: str) -> str:
    return f"""\b
Several processes: --nproc-per-node N runs this command again as
  python -m torch.distributed.run --standalone --nproc-per-node N -m -- sppcli {command} ...
or launch torchrun yourself, with `--` before the command (without it torchrun
takes --run for its own --run-path):
  torchrun --standalone --nproc-per-node N -m -- sppcli {command} --run R ..."""


def _nproc_option(share: str):
    return option("--nproc-per-node", "nproc", type=_ProcessCount(), default=1, show_default=True,
                  help=f"Processes on this machine (torchrun): {share} Above 1 the command runs itself again "
                       "under torchrun (see below) and exits with its status; inside torchrun (WORLD_SIZE set) "
                       "it is ignored. Not saved with the run.")


def _torchrun_if_asked(nproc: int) -> None:
    """``--nproc-per-node N`` (N > 1) outside torchrun: run this very command line in N torchrun workers and exit
    with their status. The caller has resolved the config first, so a bad value stops once, in one line."""
    from stages.core import launch

    if nproc == 1:
        return
    if launch.under_torchrun():
        if os.environ.get("WORLD_SIZE") != str(nproc):
            log.warning(f"--nproc-per-node {nproc} ignored: this is already one of torchrun's "
                        f"{os.environ.get('WORLD_SIZE')} processes")
        return
    ctx = click.get_current_context()
    ctx.exit(launch.relaunch(nproc, "sppcli", ctx.meta[ARGV]))


def _conv_from_option(func):
    return option("--conv-from", type=click.Choice(CONV_SOURCES), default="pretrain",
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
    if result.skipped and os.environ.get("RANK", "0") != "0":
        return  # a torchrun rank other than 0 found it done: rank 0 says so
    if result.skipped:
        click.echo(f"up to date: {result.manifest.path}")
    if result.summary:
        click.echo(result.summary)


EPILOG = """\b
Output: results (stage summaries, tables) go to stdout; progress notes,
warnings ("warning: ...") and errors ("error: ...") to stderr.

\b
Environment:
  SPP_VOC_ROOT        VOCdevkit folder for --dataset voc2007 when --voc-root
                      is not given  [default: data/VOCdevkit]
  SPP_PROGRESS        1: progress bars even when stderr is not a terminal
                      (one plain line per update, at most every 30 s);
                      0: never  [default: on when stderr is a terminal]
  SPP_DISK_MARGIN_MB  free space (MiB) a stage leaves on the disk it writes
                      to, stopping with one line instead  [default: 256]
  SPP_KEEP_FREED_MEMORY
                      0: extract-features, detect and bench leave the C
                      allocator as it is; else they keep freed memory for
                      reuse (no page faults per image; the process keeps
                      about its peak memory until it exits)  [default: 1]
  WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE
                      set by torchrun: pretrain, proposals and
                      extract-features share the work between its
                      processes (--nproc-per-node N launches them)
  TORCHELASTIC_RUN_ID, TORCHELASTIC_RESTART_COUNT
                      set by torchrun: rank 0 of proposals takes only
                      the other ranks' files of this very launch
  OMP_NUM_THREADS     CPU threads of the torch kernels

\b
Shell completion: put the line for your shell in its startup file
  bash (~/.bashrc):   eval "$(_SPP_COMPLETE=bash_source spp)"
  zsh (~/.zshrc):     eval "$(_SPP_COMPLETE=zsh_source spp)"
  fish (~/.config/fish/completions/spp.fish):
                      _SPP_COMPLETE=fish_source spp | source
"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110,
                                          "show_default": True}, epilog=EPILOG)
@option("-v", "--verbose", count=True, show_default=False,
        help="More on stderr: -v adds sppnet's debug lines, -vv every library's too.")
@option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr, and no progress bars unless "
        "--progress; results still go to stdout.")
@option("--progress/--no-progress", default=None, show_default="auto: $SPP_PROGRESS, else on when stderr is a "
        "terminal", help="Progress bars on stderr. On a file or pipe a bar prints one plain line per update, "
        "at most every 30 s.")
@click.version_option(package_name="sppnet")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, progress: bool | None) -> None:
    """SPP-net object detection, stage by stage.

    \b
    pretrain -> proposals -> extract-features -> finetune -> train-svm -> train-bbox -> detect -> eval
    Every stage reads the previous stages' artifacts from <runs-root>/<run>/ and writes its own folder there.
    """
    if verbose and quiet:
        raise click.UsageError("-v and -q cannot go together")
    from stages.core import logs

    ctx.call_on_close(logs.configure(verbosity=-1 if quiet else verbose, progress=progress))


# -- datasets ---------------------------------------------------------------------------------------------------
@cli.group()
def data() -> None:
    """Datasets: generate the embedded default; cut a classification set from a detection split."""


@data.command("synth")
@option("--out", type=click.Path(file_okay=False), default="data/synth", show_default=True,
        help="VOCdevkit folder to write (VOC2007/ and classification/ inside).")
@option("--seed", type=int, default=0, show_default=True, help="Seed of the generator: same seed, same files.")
@option("--num-images", type=int, default=None, show_default="480",
        help="Detection images over all splits.")
@option("--images", "images_alias", type=int, default=None, hidden=True)  # the old spelling of --num-images
@option("--crops-per-class", type=int, default=None, show_default="1000",
        help="Classification train images per class (val gets a quarter).")
@_errors_as_one_line
def data_synth(out, seed, num_images, images_alias, crops_per_class):
    """Generate the embedded default dataset (VOC2007 layout + a classification set), deterministic per seed."""
    from stages import synth

    num_images = _num_images(num_images, images_alias)
    summary = synth.generate(Path(out), seed=seed, images=synth.DEFAULT_IMAGES if num_images is None else num_images,
                             crops_per_class=crops_per_class)
    click.echo(summary)


def _num_images(num_images: int | None, images_alias: int | None) -> int | None:
    """--num-images, or the count given with its old spelling --images (bench, data synth)."""
    if images_alias is None:
        return num_images
    if num_images is not None:
        raise click.UsageError("--images is the old spelling of --num-images: give one of them")
    log.warning("--images N is now --num-images N here (--images names image files in spp detect)")
    return images_alias


@data.command("crops")
@option("--dataset", type=click.Choice(DATASETS), default="voc2007", show_default=True, help=DATASET_HELP)
@option("--voc-root", default=None, type=click.Path(file_okay=False), show_default=VOC_ROOT_DEFAULT,
        help=VOC_ROOT_HELP)
@option("--split", default="train", show_default=True, help="Detection split whose objects are cut out.")
@option("--out", required=True, type=click.Path(file_okay=False),
        help="ImageFolder tree to write (train/<class>/*.jpg, val/<class>/*.jpg, CROPS.json).")
@option("--context", type=float, default=0.1, show_default=True,
        help="Grow each box by this fraction of its width/height on every side.")
@option("--val-fraction", type=float, default=0.2, show_default=True,
        help="Fraction of the split's images (not crops) whose crops go to val/.")
@option("--short-side", type=int, default=96, show_default=True, help="Crop shorter side after resizing, px.")
@option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val division of images.")
@_errors_as_one_line
def data_crops(dataset, voc_root, split, out, context, val_fraction, short_side, seed):
    """Ground-truth object crops (non-difficult, with context) of a split as an ImageFolder set for pretrain."""
    from stages import crops

    click.echo(crops.write_crops(Path(os.path.abspath(out)), dataset=dataset, voc_root=voc_root, split=split,
                                 context=context, val_fraction=val_fraction, seed=seed, short_side=short_side))


# -- stages -----------------------------------------------------------------------------------------------------
@cli.command(epilog=_torchrun_epilog("pretrain"))
@_run_options
@option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
        show_default="pretrain.data, else <voc-root>/classification of the synth dataset",
        help="ImageFolder tree (train/<class>/*.jpg, val/<class>/*.jpg).")
@option("--epochs", type=int, default=None, show_default=f"pretrain.epochs: {FROM_RUN}",
        help="Training epochs (0: no training, the initial weights with fresh fc layers).")
@option("--init", default=None, type=click.Path(dir_okay=False),
        show_default="pretrain.init, else fresh weights (or model.weights' trunk)",
        help="Start from this local weights file (an sppnet checkpoint or a trunk state dict).")
@_nproc_option("DistributedDataParallel (gloo on CPU, nccl with one GPU each); pretrain.batch_size stays the "
               "global batch, split among them.")
@_errors_as_one_line
def pretrain(data_dir, epochs, init, nproc, **common):
    """Classification pretraining of backbone + SPP + fc6/fc7/fc8, multi-size (torchrun-ready)."""
    from stages import pretrain as stage

    cfg = _config(**common, extra={"pretrain.data": data_dir, "pretrain.epochs": epochs, "pretrain.init": init})
    _torchrun_if_asked(nproc)
    _report(stage.run(cfg))


@cli.command(epilog=_torchrun_epilog("proposals --split S"))
@_run_options
@option("--split", required=True, help="Image set, e.g. trainval or test.")
@option("--boxes-file", default=None, type=click.Path(dir_okay=False),
        show_default="none: run selective search",
        help="Use precomputed proposals (.h5 with boxes/<id>, or .npz / .mat-like {id: [N,4] x1y1x2y2 1-based}).")
@option("--workers", type=int, default=None, show_default="proposals.workers (0)",
        help="Processes (0 = all cores); not saved with the run.")
@_nproc_option("each takes the images r::N (with --workers 0, its share of the cores); rank 0 writes the one "
               "proposals.h5.")
@_errors_as_one_line
def proposals(split, boxes_file, workers, nproc, **common):
    """Selective search (fast mode) per image, cached in HDF5, resumable; reports recall@0.5/0.7."""
    from stages import proposals as stage

    cfg = _config(**common, extra={"proposals.workers": workers})
    _torchrun_if_asked(nproc)
    _report(stage.run(cfg, split, boxes_file=Path(boxes_file) if boxes_file else None))


@cli.command("extract-features", epilog=_torchrun_epilog("extract-features --split S"))
@_run_options
@option("--split", required=True, help="Image set, e.g. trainval or test.")
@option("--scales", default=None, show_default=f"features.scales: {FROM_RUN}",
        help="Comma-separated shorter sides, e.g. 688 or 480,576,688,874,1200.")
@_conv_from_option
@_nproc_option("each takes the images r::N into its own features.rank<r>.h5 (one GPU each).")
@_errors_as_one_line
def extract_features(split, scales, conv_from, nproc, **common):
    """conv5 maps of every image at every scale into HDF5 (float16, chunked), resumable, torchrun-sharded."""
    from stages import extract_features as stage

    extra = {"features.scales": [int(s) for s in scales.split(",")] if scales else None}
    cfg = _config(**common, extra=extra)
    _torchrun_if_asked(nproc)
    from stages.core.memory import keep_freed_memory

    keep_freed_memory()  # as spp detect: each image's conv activations reuse freed memory
    _report(stage.run(cfg, split, conv_from=conv_from))


@cli.command(epilog=_torchrun_epilog("finetune"))
@_run_options
@option("--iters", type=int, default=None, show_default=f"finetune.iters: {FROM_RUN}",
        help="Training iterations (mini-batches of finetune.batch_size windows).")
@option("--conv/--no-conv", default=None, show_default=f"finetune.conv: {FROM_RUN} (off)",
        help="Also fine-tune the conv layers through SPP (beyond the paper).")
@_nproc_option("DistributedDataParallel (gloo on CPU, nccl with one GPU each); finetune.batch_size stays the "
               "global batch, its windows (with --conv, its images) split among them.")
@_errors_as_one_line
def finetune(iters, conv, nproc, **common):
    """Fine-tune fc6, fc7 and a new (N+1)-way fc8 on SPP-pooled windows from the conv5 cache (torchrun-ready)."""
    from stages import finetune as stage

    cfg = _config(**common, extra={"finetune.iters": iters, "finetune.conv": conv})
    _torchrun_if_asked(nproc)
    _report(stage.run(cfg))


def _variant_options(func=None, *, scorers: bool = False):
    """--feature and --one-scale; with ``scorers``, --feature also takes ``softmax`` (detect, eval)."""
    if func is None:
        return functools.partial(_variant_options, scorers=scorers)
    func = option("--one-scale", is_flag=True, help="Use only features.one_scale (the paper's 1-scale rows).")(func)
    help_text = "Features the SVMs use: pool5 (pooled conv5), fc6/fc7 (pretrained), ftfc6/ftfc7."
    if scorers:
        help_text += " softmax: the fine-tuned fc8's class probabilities, no SVMs."
    func = option("--feature", type=click.Choice(SCORERS if scorers else FEATURES), default="ftfc7",
                  show_default=True, help=help_text)(func)
    return func


def _svd_ranks(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ranks = [int(part) for part in value.split(",")]
    except ValueError:
        ranks = []
    if len(ranks) != 2:
        raise click.BadParameter(f"expected two ranks FC6,FC7 such as 1024,256, got {value!r}")
    return ranks


def _fc_compression_options(func):
    """--fc-compression and --fc-svd-ranks (detect.fc_compression / fc_svd_ranks): train-svm, detect and bench
    share them, so that SVMs are trained on the fc features that detect computes."""
    func = option("--fc-svd-ranks", default=None, metavar="FC6,FC7", callback=_svd_ranks,
                  show_default=f"detect.fc_svd_ranks: {FROM_RUN} (1024,256)",
                  help="Singular values kept of fc6 and fc7 by --fc-compression svd; a rank >= a layer's "
                       "smaller side keeps it whole.")(func)
    return option("--fc-compression", type=click.Choice(CHOICES["detect.fc_compression"]), default=None,
                  show_default=f"detect.fc_compression: {FROM_RUN} (none)",
                  help="Less fc6/fc7 work: svd (Fast R-CNN's truncated SVD, no retraining) or int8 (dynamic int8 "
                       "layers, CPU only); none is exact. train-svm and detect save it in the run, so that both "
                       "use it from then on.")(func)


def _fc_overrides(fc_compression, fc_svd_ranks) -> dict:
    return {"detect.fc_compression": fc_compression, "detect.fc_svd_ranks": fc_svd_ranks}


@cli.command("train-svm")
@_run_options
@_variant_options
@_fc_compression_options
@_errors_as_one_line
def train_svm(feature, one_scale, fc_compression, fc_svd_ranks, **common):
    """Per-class linear SVMs with hard-negative mining (liblinear settings of the released code)."""
    from stages import train_svm as stage

    cfg = _config(**common, extra=_fc_overrides(fc_compression, fc_svd_ranks))
    _report(stage.run(cfg, feature=feature, one_scale=one_scale))


@cli.command("train-bbox")
@_run_options
@option("--one-scale", is_flag=True, help="Use only features.one_scale (the paper's 1-scale rows).")
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
@option("--split", default=None, show_default="data.test_split", help="Image set to detect on.")
@option("--bbox/--no-bbox", default=None, show_default=f"detect.bbox: {FROM_RUN} (on)",
        help="Apply box regression (from spp train-bbox).")
@option("--images", "image_options", multiple=True, metavar="PATH",
        help="Detect on your own images instead of a split: an image file, a folder (its jpg, jpeg, png, "
             "bmp, tif, tiff, webp files) or a glob pattern such as 'photos/**/*.jpg' (quote it). Repeatable; "
             "any further PATHS count too (--images a.jpg b.jpg), after the --images values.")
@option("--out", default=None, type=click.Path(file_okay=False),
        help="With images: the folder for <id>_detections.jpg and detections.json.")
@option("--score-thresh", type=float, default=None,
        show_default="0.0 for SVM scores (their decision boundary), 0.5 for --feature softmax (a probability)",
        help="With images: keep detections scoring above this.")
@option("--skip-bad", is_flag=True, default=False,
        help="With images: skip an unreadable, corrupt or non-image file with a one-line warning (also "
             "--set data.skip_bad=true) instead of stopping at it.")
@option("--comp4", "comp4_name", default=None, metavar="NAME",
        help="With images: also write devkit files comp4_det_NAME_<class>.txt (1-based inclusive boxes, "
             "image ids as in detections.json), e.g. --comp4 test for `spp eval --detections OUT --split "
             "test`; pair it with a low --score-thresh such as -1.5 for AP.")
@_fc_compression_options
@_errors_as_one_line
def detect(paths, feature, one_scale, split, bbox, image_options, out, score_thresh, skip_bad, comp4_name,
           fc_compression, fc_svd_ranks, **common):
    """Score every proposal, per-class NMS, optional box regression; writes devkit comp4 files.

    Or, with --images (or PATHS), detect on your own images with the run's trained models; nothing is written
    to the run then.

    \b
      spp detect --run R --one-scale --images photos/ 'more/*.png' x.jpg --out drawn/
    \b
    OUT/<id>_detections.jpg  each image drawn (<id>: its file stem, made unique with _2, _3, ...)
    OUT/detections.json      {"format", "box_convention", "run", "feature", "classes", "score_thresh", ...,
                              "complete", "images": [{"image", "id", "drawn", "width", "height",
                              "detections": [{"class", "score", "box": [x1, y1, x2, y2]}]}], "skipped",
                              "profile": seconds per phase (docs/pipeline.md)}
    Boxes are float pixel coordinates, 0-based from the image's top-left corner (EXIF orientation applied),
    x1/y1 inclusive and x2/y2 exclusive (width = x2 - x1), highest score first.
    """
    from stages.core.memory import keep_freed_memory

    keep_freed_memory()  # per-image tensors reuse freed memory instead of faulting in fresh pages
    images = [*image_options, *paths]
    if not images:
        given = [name for name, value in (("--out", out), ("--score-thresh", score_thresh),
                                          ("--skip-bad", skip_bad or None), ("--comp4", comp4_name))
                 if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --images")
        from stages import detect as stage

        cfg = _config(**common, extra={"detect.bbox": bbox, **_fc_overrides(fc_compression, fc_svd_ranks)})
        _report(stage.run(cfg, split or cfg.data.test_split, feature=feature, one_scale=one_scale,
                          started=STARTED))
        return
    if split:
        raise click.UsageError("--split and --images (or PATHS) cannot go together: detect on a split or on images")
    if not out:
        raise click.UsageError("--images needs --out DIR")
    from stages.detector import Detector, detect_images

    cfg = _config(**common, extra={"detect.bbox": bbox, **_fc_overrides(fc_compression, fc_svd_ranks)})
    detector = Detector(cfg, feature=feature, bbox=cfg.detect.bbox, one_scale=one_scale, score_thresh=score_thresh)
    _report(detect_images(detector, images, Path(out), comp4=comp4_name, skip_bad=skip_bad or cfg.data.skip_bad,
                          started=STARTED))


@cli.command("eval")
@_run_options
@_variant_options(scorers=True)
@option("--split", default=None, show_default="data.test_split", help="Image set to score.")
@option("--bbox/--no-bbox", default=None, show_default=f"detect.bbox: {FROM_RUN} (on)",
        help="Score the detections made with box regression (or without).")
@option("--detections", default=None, type=click.Path(file_okay=False),
        help="Folder of comp4_det_<split>_<class>.txt files to score (instead of the run's own).")
@option("--out", default=None, type=click.Path(file_okay=False), show_default="the run's 07_eval/<tag>/",
        help="Where metrics.json and the PR plot go.")
@option("--metric", type=click.Choice(["voc07", "area"]), default="voc07", show_default=True,
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
@option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
        help="Also write the rows (mAP and per-class AP of each variant) to this JSON file.")
@_errors_as_one_line
def table9(json_out, **common):
    """Print the paper's Table 9 rows for this run (from its eval results); reads the run, writes nothing there."""
    from stages import report

    cfg = _config(**common)
    click.echo(report.table9(cfg, json_out=Path(json_out) if json_out else None))


@cli.command()
@_run_options
@option("--out", default=None, type=click.Path(file_okay=False), show_default="<run>/report",
        help="Folder for report.html and the PNG figures it shows (not the run itself nor a stage folder).")
@_errors_as_one_line
def report(out, **common):
    """Write one self-contained HTML page about the run: Table 9, per-class AP, PR curves, training curves,
    proposal recall, stage wall times and drawn test detections; reads the run, writes only into --out."""
    from stages import report as table
    from stages import report_page

    cfg = _config(**common)
    click.echo(report_page.write_report(cfg, table.table9_data(cfg), Path(out) if out else None))


@cli.command()
@_run_options
@option("--backbone", default=None, type=click.Choice(CHOICES["model.backbone"]),
        show_default="model.backbone of the run or preset", help="Trunk to time.")
@option("--num-images", "n_images", type=int, default=3, show_default=True,
        help="Images timed: the first of the run's test split, else synthetic ones.")
@option("--images", "images_alias", type=int, default=None, hidden=True)  # the old spelling of --num-images
@option("--windows", type=int, default=2000, show_default=True,
        help="Windows per image (the run's proposals, topped up with random boxes).")
@option("--repeats", type=int, default=3, show_default=True,
        help="Timed passes per image and mode (their median counts).")
@option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
        help="Also write the measurements to this JSON file.")
@option("--fc-dtype", type=click.Choice(CHOICES["detect.fc_dtype"]), default="float32", show_default=True,
        help="fc6/fc7 precision in every mode (bfloat16: ~2x on CPUs with AVX512-BF16/AMX and on GPUs).")
@option("--threads", type=int, default=None, show_default="every core this process may use",
        help="CPU threads for the kernels (0: every core).")
@option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
        help="cpu: process CPU time (with --threads 1, for a machine shared with other jobs).")
@option("--sustained-seconds", type=click.FloatRange(0, 600), default=6.0, show_default=True,
        help="After the timed runs, run each type's best GEMM back to back this long: the rate it holds beside "
             "its best call (0: skip).")
@_fc_compression_options
@_errors_as_one_line
def bench(backbone, n_images, images_alias, windows, repeats, json_out, fc_dtype, threads, clock, sustained_seconds,
          fc_compression, fc_svd_ranks, **common):
    """Time R-CNN mode vs SPP 1-scale vs SPP 5-scale per image (conv, pool, fc), with FLOP rates. Every mode also
    runs fc6+fc7 in float32, bfloat16, svd and int8 on its own windows in the same runs: per variant SPP and R-CNN
    totals and their ratio, fc rate against the matmul peak of its own type, distance to float32."""
    from stages import bench as stage
    from stages.core.memory import keep_freed_memory

    keep_freed_memory()  # as spp detect: what R-CNN and SPP mode time is the work, not page faults
    if images_alias is not None:
        n_images = _num_images(None, images_alias)

    cfg = _config(**common, extra={"model.backbone": backbone, **_fc_overrides(fc_compression, fc_svd_ranks)})
    click.echo(stage.run(cfg, n_images=n_images, windows=windows, repeats=repeats,
                         json_out=Path(json_out) if json_out else None, fc_dtype=fc_dtype, threads=threads,
                         clock=clock, sustained_seconds=sustained_seconds))


def main() -> None:
    cli(prog_name="spp")


if __name__ == "__main__":
    main()
