"""``spp report``: one self-contained HTML page about a run, with the PNG figures it shows beside it.

Sections: the run (config highlights, code versions, dates), Table 9, per-class AP of every evaluated variant,
precision/recall curves named by variant, pretraining and fine-tuning curves, proposal recall per split, the
wall time of every stage, and a few test images with the best variant's top detections drawn.

It only reads the run (like ``spp table9``) and writes ``report.html`` and its PNGs into one folder (default
``<run>/report/``), each file atomically, the page last. A section whose inputs are not there yet says so in one
line naming the command that makes them; nothing missing stops the page. No external resources: inline CSS,
images by relative name, no scripts.

Table 9 itself comes from ``stages.report.table9_data``: stage modules do not import each other (the
import-linter contract), so the CLI passes its result in.
"""
from __future__ import annotations

import html
import io
import json
import os
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .core.artifacts import MANIFEST_NAME, Manifest, Run, atomic_write_bytes, read_manifest
from .core.errors import SppError
from .core.registry import STAGES

PAGE_NAME = "report.html"
FIG_DPI = 120  # every figure's resolution (sharp on a laptop screen at the page's width)
MAX_IMAGES = 6  # test images drawn with detections
SHOW_PER_IMAGE = 3  # detections drawn per image on average (the threshold is chosen for this), ...
MAX_PER_IMAGE = 6  # ... at most this many on one image, and always its best one
# (anchor, heading) of the sections, in page order; the tests check that each heading is there.
SECTIONS = (("run", "Run"), ("table9", "Table 9"), ("per-class", "Per-class AP"),
            ("pr", "Precision/recall curves"), ("pretrain", "Pretraining"), ("finetune", "Fine-tuning"),
            ("proposals", "Proposal recall"), ("times", "Stage wall times"),
            ("detections", "Detections on test images"))


@dataclass
class _Page:
    """What the sections produce: HTML fragments, the PNGs they link to, and the one-line notes of what is missing."""

    images: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def figure(self, name: str, fig, alt: str, css_class: str = "") -> str:
        """Render a matplotlib figure to ``name`` (PNG) and return its ``<img>``."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=FIG_DPI)
        self.images[name] = buffer.getvalue()
        width, height = (int(v) for v in fig.get_size_inches() * FIG_DPI)
        cls = f' class="{css_class}"' if css_class else ""
        return (f'<img src="{_esc(name)}" alt="{_esc(alt)}" width="{width}" height="{height}"{cls} '
                f'loading="lazy">')

    def missing(self, text: str, command: str | None = None) -> str:
        """One line saying what is not there yet (and the command that makes it)."""
        self.notes.append(f"{text}: run `{command}`" if command else text)
        run = f": run <code>{_esc(command)}</code>" if command else ""
        return f'<p class="missing">{_esc(text)}{run}</p>'


def write_report(cfg, table9: dict, out: Path | None = None, *, max_images: int = MAX_IMAGES,
                 now: Callable[[], str] | None = None) -> str:
    """Write ``report.html`` and its PNGs for the run of ``cfg`` into ``out`` (default ``<run>/report``).
    ``table9`` is ``stages.report.table9_data(cfg)``. Returns the lines to print."""
    run = Run(cfg.run_dir)
    if not (run.root / "config.json").is_file():
        raise SppError("no run here (no config.json): nothing to report; start it with "
                       f"`{run.command_for('pretrain', None)}`", run.root)
    out = Path(out) if out is not None else run.root / "report"
    _check_out(run, out)
    page = _Page()
    manifests = _all_manifests(run, out)
    evals = _eval_manifests(run, table9)
    body = []
    sections = {
        "run": lambda: _section_run(cfg, run, manifests, now),
        "table9": lambda: _section_table9(page, run, table9),
        "per-class": lambda: _section_per_class(page, cfg, run, table9, evals),
        "pr": lambda: _section_pr(page, cfg, run, table9, evals),
        "pretrain": lambda: _section_pretrain(page, cfg, run),
        "finetune": lambda: _section_finetune(page, cfg, run),
        "proposals": lambda: _section_proposals(page, cfg, run),
        "times": lambda: _section_times(page, run, manifests),
        "detections": lambda: _section_detections(page, cfg, run, table9, max_images),
    }
    for anchor, heading in SECTIONS:
        try:
            content = sections[anchor]()
        except (SppError, OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            # a damaged input (manifest, history.json, detections.npz): say so in its section, show the rest
            content = page.missing(f"could not show this section: {type(err).__name__}: {' '.join(str(err).split())}")
        body.append(f'<section id="{anchor}">\n<h2>{_esc(heading)}</h2>\n{content}\n</section>')
    document = _document(cfg, body)
    for name, data in page.images.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / PAGE_NAME, document.encode())
    lines = [f"report of run '{cfg.run}': {len(page.images)} figures, {len(SECTIONS)} sections"]
    lines += [f"  not shown: {note}" for note in page.notes]
    lines.append(f"written: {out / PAGE_NAME}")
    return "\n".join(lines)


# -- where the page goes ------------------------------------------------------------------------------------------
def _check_out(run: Run, out: Path) -> None:
    """The output folder must not be the run itself or one of its stage folders (the page only reads the run), and
    must be writable: made here, and probed with a temporary file, before any work."""
    target = out.resolve()
    root = run.root.resolve()
    stage_folders = {root / info.folder for info in STAGES.values()}
    if target == root or any(target == f or f in target.parents for f in stage_folders):
        raise SppError("the report does not write into the run or its stage folders; choose another --out", out)
    if (out / MANIFEST_NAME).exists():
        raise SppError("this folder holds a stage's manifest; choose another --out", out)
    out.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out, prefix=".report.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


# -- reading the run ----------------------------------------------------------------------------------------------
def _read(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _manifest(run: Run, stage: str, tag: str | None = None) -> Manifest | None:
    return _read(run.manifest_path(stage, tag))


def _all_manifests(run: Run, out: Path) -> list[Manifest]:
    """Every stage manifest of the run (``<NN_stage>/MANIFEST.json`` and ``<NN_stage>/<tag>/MANIFEST.json``), in
    pipeline order; unreadable ones are left out."""
    found = []
    for info in sorted(STAGES.values(), key=lambda i: i.folder):
        folder = run.root / info.folder
        paths = [folder / MANIFEST_NAME] + sorted(folder.glob(f"*/{MANIFEST_NAME}"))
        for path in paths:
            if out.resolve() in path.resolve().parents:
                continue
            try:
                manifest = _read(path)
            except SppError:
                continue
            if manifest is not None:
                found.append(manifest)
    return found


@dataclass(frozen=True)
class _Eval:
    tag: str
    manifest: Manifest
    metrics: dict  # metrics.json (the manifest's metrics hold the same)


def _eval_manifests(run: Run, table9: dict) -> list[_Eval]:
    """Every finished eval of the run: Table 9's variants in its order first, then any other (another split or
    the area metric)."""
    order = [tag for key, tag in table9.get("tags", {}).items()]
    found = {}
    for path in sorted((run.root / STAGES["eval"].folder).glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = _read(path)
        except SppError:
            continue
        if manifest is None or "ap" not in manifest.metrics:
            continue
        found[path.parent.name] = _Eval(path.parent.name, manifest, manifest.metrics)
    ranked = sorted(found, key=lambda t: (order.index(t) if t in order else len(order), t))
    return [found[t] for t in ranked]


def _best_test_variant(table9: dict) -> tuple[str, float] | None:
    """The Table 9 variant with the highest mAP: (tag, mAP)."""
    best = None
    for (label, column), tag in table9.get("tags", {}).items():
        cell = table9["rows"].get(label, {}).get(column)
        if cell and (best is None or cell["mAP"] > best[1]):
            best = (tag, cell["mAP"])
    return best


# -- sections -----------------------------------------------------------------------------------------------------
def _section_run(cfg, run: Run, manifests: list[Manifest], now) -> str:
    c = cfg
    scales = ", ".join(str(s) for s in c.features.scales)
    weights = c.model.weights or "none (trained here)"
    rows = [
        ("run", f"{_esc(c.run)} <span class=\"dim\">({_esc(str(run.root))})</span>", True),
        ("dataset", f"{c.data.dataset}: {c.data.voc_root or '(default folder)'}; train on {c.data.train_split}, "
                    f"test on {c.data.test_split}", False),
        ("model", f"{c.model.backbone} (width {c.model.width:g}), SPP pyramid {list(c.model.pyramid)}, fc "
                  f"{c.model.fc_dim}; trunk weights: {weights}", False),
        ("features", f"scales {scales}; 1-scale {c.features.one_scale}; flip {'on' if c.features.flip else 'off'}",
         False),
        ("pretrain", f"{c.pretrain.epochs} epochs at sizes {list(c.pretrain.sizes)}, {c.pretrain.optimizer} lr "
                     f"{c.pretrain.lr:g}, batch {c.pretrain.batch_size}", False),
        ("fine-tune", f"{c.finetune.iters} iterations, lr {c.finetune.lr:g} (x0.1 at "
                      f"{list(c.finetune.lr_steps)}), batch {c.finetune.batch_size}"
                      f"{', conv layers too' if c.finetune.conv else ''}", False),
        ("proposals", f"selective search ks {list(c.proposals.ks)}, at most "
                      f"{c.proposals.max_boxes or 'all'} boxes per image", False),
        ("svm / bbox / detect", f"C {c.svm.C:g}, hard-negative pruning {c.svm.pruning}; box-regression lambda "
                                f"{c.bbox.lam:g}; NMS {c.detect.nms_iou:g}, score above {c.detect.score_thresh:g}"
                                f"{', mirrored image scored too' if c.detect.test_flip else ''}",
         False),
        ("seed", str(c.seed), False),
    ]
    versions = Counter(m.data.get("code_version", "unknown") for m in manifests)
    if versions:
        text = ", ".join(f"{v} ({n} stage output{'s' if n > 1 else ''})" for v, n in versions.most_common())
    else:
        text = "no stage has finished yet"
    rows.append(("code version", text, False))
    created = sorted(m.data["created"] for m in manifests if m.data.get("created"))
    if created:
        rows.append(("stages finished", f"{_date(created[0])} to {_date(created[-1])}", False))
    rows.append(("report written", (now or (lambda: time.strftime("%Y-%m-%d %H:%M:%S %z")))(), False))
    cells = "\n".join(f"<tr><th>{_esc(k)}</th><td>{v if raw else _esc(v)}</td></tr>" for k, v, raw in rows)
    return f'<table class="kv">\n{cells}\n</table>'


def _section_table9(page: _Page, run: Run, table9: dict) -> str:
    columns = list(table9["columns"])
    rows = table9["rows"]
    evaluated = [(label, col) for label, row in rows.items() for col in columns if row.get(col)]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    lines = [f'<p>VOC07 11-point mAP (%) on <b>{_esc(table9["split"])}</b>, {_esc(table9["dataset"])}, '
             f'{_esc(table9["backbone"])}; scales {table9["scales"]}, 1-scale {table9["one_scale"]}. '
             'The paper: SPP ZF-5, VOC07 test, 1-scale / 5-scale.</p>',
             f'<table class="num" id="table9-data">\n<tr><th>SVM on</th>{head}<th>paper</th></tr>']
    best = max((rows[label][col]["mAP"] for label, col in evaluated), default=None)
    for label, row in rows.items():
        cells = []
        for col in columns:
            tag = table9["tags"][label, col]
            cell = row.get(col)
            if cell:
                strong = ' class="best"' if cell["mAP"] == best else ""
                cells.append(f'<td data-tag="{_esc(tag)}"{strong} title="{_esc(tag)}">{cell["mAP"] * 100:.1f}</td>')
            else:
                cells.append(f'<td data-tag="{_esc(tag)}" class="dim" title="{_esc(tag)}: not evaluated">-</td>')
        paper = " / ".join("-" if v is None else f"{v:.1f}" for v in table9["paper"][label])
        lines.append(f"<tr><th>{_esc(label)}</th>{''.join(cells)}<td class=\"dim\">{paper}</td></tr>")
    lines.append("</table>")
    if not evaluated:
        tag = table9["tags"].get(("ftfc7 bb", columns[-1]))
        lines.append(page.missing("no variant evaluated yet", run.command_for("eval", tag)))
    elif table9["missing"]:
        first = table9["missing"][0]
        lines.append(f'<p class="dim">not evaluated yet: {_esc(", ".join(table9["missing"]))} '
                     f'(e.g. <code>{_esc(run.command_for("eval", first))}</code>)</p>')
    return "\n".join(lines)


def _section_per_class(page: _Page, cfg, run: Run, table9: dict, evals: list[_Eval]) -> str:
    if not evals:
        tag = table9["tags"].get(("ftfc7 bb", list(table9["columns"])[-1]))
        return page.missing("no variant evaluated yet", run.command_for("eval", tag))
    evaluated = list(dict.fromkeys(name for e in evals for name in e.metrics["ap"]))  # sorted by name in JSON
    order = _dataset_classes(cfg)  # so the dataset's own order, where the dataset is there to say it
    classes = [c for c in order if c in evaluated] + [c for c in evaluated if c not in order]
    head = "".join(f'<th class="tag">{_esc(e.tag).replace("-", "-<wbr>")}{_metric_note(e.metrics)}</th>'
                   for e in evals)
    lines = ['<p>AP (%) per class; one column per evaluated variant (<code>07_eval/&lt;tag&gt;</code>), the best of '
             'each row in bold where they differ.</p>',
             f'<div class="scroll"><table class="num" id="per-class-data">\n<tr><th>class</th>{head}</tr>']
    for name in classes + ["mAP"]:
        values = [e.metrics["mAP"] if name == "mAP" else e.metrics["ap"].get(name) for e in evals]
        finite = [v for v in values if v is not None and np.isfinite(v)]
        top = max(finite, default=None)
        best = ' class="best"' if len(set(finite)) > 1 else ""  # bold only where the variants differ
        cells = "".join("<td>-</td>" if v is None else f'<td{best if v == top else ""}>{v * 100:.1f}</td>'
                        for v in values)
        cls = ' class="total"' if name == "mAP" else ""
        lines.append(f"<tr{cls}><th>{_esc(name)}</th>{cells}</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _metric_note(metrics: dict) -> str:
    metric = metrics.get("metric", "voc07")
    return "" if metric == "voc07" else f" ({_esc(metric)})"


def _dataset_classes(cfg) -> tuple[str, ...]:
    """The dataset's class order (the tables follow it), or none when the dataset is not there."""
    from .core.voc import VocDataset

    try:
        return VocDataset.from_config(cfg.data).classes
    except (SppError, OSError):
        return ()


def _section_pr(page: _Page, cfg, run: Run, table9: dict, evals: list[_Eval]) -> str:
    if not evals:
        tag = table9["tags"].get(("ftfc7 bb", list(table9["columns"])[-1]))
        return page.missing("no PR curves: no variant evaluated yet", run.command_for("eval", tag))
    curves, problems = {}, []
    annotations: dict[str, tuple] = {}
    for e in evals:
        try:
            curves[e.tag] = _curves_of(cfg, run, e, annotations)
        except (SppError, OSError, ValueError) as err:
            problems.append(f"{e.tag}: {err}")
    parts = []
    if curves:
        best = max(curves, key=lambda t: curves[t]["mAP"])
        parts.append("<p>Each panel one variant, titled with its tag and mAP; one line per class (recomputed from "
                     "the variant's comp4 detections, as <code>spp eval</code> does). Per-class panels of each "
                     "variant below.</p>")
        parts.append(page.figure("pr_overview.png", _pr_overview(curves), "PR curves of every variant"))
        for tag, result in curves.items():
            img = page.figure(f"pr_{tag}.png", _pr_per_class(tag, result), f"PR curves of {tag} per class")
            changed = ""
            recorded = next(e for e in evals if e.tag == tag).metrics["mAP"]
            if abs(recorded - result["mAP"]) > 1e-9:
                changed = (f' <span class="warn">(its metrics.json says {recorded * 100:.1f}: the detections '
                           f'changed since; rerun <code>{_esc(run.command_for("eval", tag))}</code>)</span>')
            opened = " open" if tag == best else ""
            parts.append(f'<details{opened}><summary>{_esc(_pr_title(tag, result))}{changed}</summary>{img}'
                         '</details>')
    for problem in problems:
        parts.append(page.missing(f"no PR curves for {problem}"))
    return "\n".join(parts)


def _curves_of(cfg, run: Run, e: _Eval, annotations: dict) -> dict:
    """Precision/recall of every class of an eval, from the comp4 files of the detect output it scored."""
    from .core.ap import evaluate_detections
    from .core.voc import VocDataset, comp4_path, read_comp4

    recorded = e.manifest.data.get("inputs", {}).get("detect")
    if not isinstance(recorded, dict) or "manifest" not in recorded:
        raise SppError("its eval records no detect output")
    detect = _read(run.root / recorded["manifest"])
    if detect is None:
        raise SppError(f"the detect output it scored is gone (no {recorded['manifest']})")
    split = e.metrics.get("split") or e.manifest.data["config"]["eval"]["split"]
    metric = e.metrics.get("metric", "voc07")
    if split not in annotations:
        dataset = VocDataset.from_config(cfg.data)
        annotations[split] = (dataset.classes, dataset.annotations(split))
    classes, anns = annotations[split]
    usable = {a.image_id for a in anns}
    comp4_dir = detect.output("comp4_dir")
    per_class = {}
    for name in classes:
        dets = read_comp4(comp4_path(comp4_dir, split, name))
        keep = np.array([i in usable for i in dets.image_ids], dtype=bool)
        if not keep.all():  # detections on images eval skipped (data.skip_bad): left out there too
            dets = type(dets)([i for i, k in zip(dets.image_ids, keep) if k], dets.scores[keep], dets.boxes[keep])
        per_class[name] = dets
    result = evaluate_detections(anns, classes, per_class, metric=metric)
    return {"mAP": result["mAP"], "ap": result["ap"], "npos": result["npos"], "curves": result["curves"],
            "metric": metric}


def _pr_title(tag: str, result: dict) -> str:
    metric = "" if result["metric"] == "voc07" else f" ({result['metric']})"
    return f"{tag}: mAP {result['mAP'] * 100:.1f}{metric}"


def _class_colours(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _pr_overview(curves: dict[str, dict]):
    fig = _figure()
    n = len(curves)
    cols = min(4, n)
    rows = -(-n // cols)
    names = list(next(iter(curves.values()))["curves"])
    colours = _class_colours(names)
    legend_rows = -(-len(names) // 10)
    fig.set_size_inches(max(2.4 * cols + 0.6, 6.0), 2.3 * rows + 0.35 + 0.25 * legend_rows + 0.3)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (tag, result) in zip(axes, curves.items()):
        for name in names:
            curve = result["curves"].get(name)
            if curve is not None and len(curve["recall"]) and result["npos"].get(name):
                ax.plot(curve["recall"], curve["precision"], lw=1.1, color=colours[name], label=name)
        ax.set_title(_pr_title(tag, result), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    _unit_axes(axes[0])
    for col in range(cols):  # the lowest shown panel of each column gets the x labels
        ax = axes[max(range(col, n, cols))]
        ax.set_xlabel("recall", fontsize=9)
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes.reshape(rows, cols)[:, 0]:
        ax.set_ylabel("precision", fontsize=9)
    handles = [_line(colours[name]) for name in names]
    width, height = fig.get_size_inches()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 10), fontsize=9, frameon=False,
               handlelength=1.5, columnspacing=1.2)
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.1 / width, bottom=(0.55 + 0.25 * legend_rows) / height,
                        top=1 - 0.3 / height, wspace=0.12, hspace=0.45)
    return fig


def _pr_per_class(tag: str, result: dict):
    fig = _figure()
    names = list(result["curves"])
    cols = min(5, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig.set_size_inches(2.3 * cols, 1.9 * rows + 0.5)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        curve = result["curves"][name]
        if len(curve["recall"]) and result["npos"][name]:
            ax.plot(curve["recall"], curve["precision"], lw=1.1, marker="." if len(curve["recall"]) < 50 else None,
                    ms=3)
        ax.set_title(f"{name}: AP {result['ap'][name] * 100:.1f}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    _unit_axes(axes[0])
    for col in range(min(cols, len(names))):  # the lowest shown panel of each column gets the x labels
        ax = axes[max(range(col, len(names), cols))]
        ax.set_xlabel("recall", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes.reshape(rows, cols)[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    fig.suptitle(_pr_title(tag, result), fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / fig.get_size_inches()[1],
                        top=1 - 0.45 / fig.get_size_inches()[1], wspace=0.12, hspace=0.45)
    return fig


def _section_pretrain(page: _Page, cfg, run: Run) -> str:
    manifest = _manifest(run, "pretrain")
    if manifest is None:
        return page.missing("not pretrained yet", run.command_for("pretrain", None))
    m = manifest.metrics
    acc = m.get("val_accuracy")
    chance = m.get("chance_accuracy")
    summary = (f"{m.get('epochs', 0)} epoch(s), {m.get('num_classes', '?')} classes, {m.get('train_images', 0)} "
               f"train / {m.get('val_images', 0)} val images; final val accuracy "
               f"{'n/a' if acc is None else f'{acc * 100:.1f}%'}"
               f"{'' if not chance else f' (chance {chance * 100:.1f}%)'}; weights from {m.get('weights_from', '?')}"
               f"; {_duration(manifest.data.get('wall_time_s'))}")
    if not m.get("epochs") or not m.get("train_loss_per_epoch"):
        trunk = cfg.model.weights or cfg.pretrain.init
        origin = f"ImageNet trunk: {trunk}" if m.get("weights_from") == "weights" and trunk else (
            f"weights from {m.get('weights_from', 'the initial weights')}")
        return page.missing(f"no pretraining epochs ({origin})") + f"\n<p>{_esc(summary)}</p>"
    epochs = np.arange(1, len(m["train_loss_per_epoch"]) + 1)
    fig = _figure()
    fig.set_size_inches(9.5, 3.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None
    ax_loss.plot(epochs, m["train_loss_per_epoch"], marker=marker, ms=3, label="train loss")
    if m.get("val_loss") is not None:
        ax_loss.plot(epochs[-1:], [m["val_loss"]], "s", color="C1", label="val loss (final)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("pretraining loss", fontsize=10)
    ax_acc.plot(epochs, np.array(m["train_accuracy_per_epoch"]) * 100, marker=marker, ms=3, label="train")
    ax_acc.plot(epochs, np.array(m["val_accuracy_per_epoch"]) * 100, marker=marker, ms=3, label="val")
    if chance:
        ax_acc.axhline(chance * 100, color="grey", ls=":", lw=1, label="chance")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("pretraining accuracy", fontsize=10)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return f"<p>{_esc(summary)}</p>\n" + page.figure("pretrain.png", fig, "pretraining curves")


def _section_finetune(page: _Page, cfg, run: Run) -> str:
    manifest = _manifest(run, "finetune")
    if manifest is None:
        return page.missing("not fine-tuned yet", run.command_for("finetune", None))
    m = manifest.metrics
    history = json.loads(manifest.output("history").read_text())
    best_error = m.get("best_holdout_error")
    summary = (f"{m.get('iterations', '?')} iterations{' (conv layers too)' if m.get('conv') else ''}; held-out "
               f"error {_pct(m.get('initial_holdout_error'))} before, best {_pct(best_error)} at iteration "
               f"{m.get('best_iteration', '?')} (the snapshot kept); {m.get('train_images', '?')} train / "
               f"{m.get('holdout_images', '?')} held-out images; {_duration(manifest.data.get('wall_time_s'))}")
    if not history:
        return f"<p>{_esc(summary)}</p>\n" + page.missing("no held-out evaluations in history.json")
    it = np.array([h["iteration"] for h in history])
    fig = _figure()
    fig.set_size_inches(9.5, 3.2)
    ax_err, ax_loss = fig.subplots(1, 2)
    marker = "o" if len(it) <= 40 else None

    def series(key):
        return np.array([np.nan if h.get(key) is None else h[key] for h in history], dtype=float)

    if m.get("initial_holdout_error") is not None:
        ax_err.plot([0], [m["initial_holdout_error"] * 100], "o", color="C0", mfc="none")
    ax_err.plot(it, series("holdout_error") * 100, marker=marker, ms=3, label="held-out error")
    ax_err.plot(it, series("train_error") * 100, marker=marker, ms=3, label="train error (since last)", alpha=0.8)
    if best_error is not None:
        ax_err.plot([m.get("best_iteration")], [best_error * 100], "*", ms=11, color="C3", label="kept snapshot")
    ax_loss.plot(it, series("holdout_loss"), marker=marker, ms=3, label="held-out loss")
    ax_loss.plot(it, series("train_loss"), marker=marker, ms=3, label="train loss (since last)", alpha=0.8)
    for ax in (ax_err, ax_loss):
        for step in cfg.finetune.lr_steps:
            if step <= it.max():
                ax.axvline(step, color="grey", ls=":", lw=1)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_err.set_ylabel("classification error (%)")
    ax_err.set_title("fine-tuning error (dotted: LR x0.1)", fontsize=10)
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("fine-tuning loss", fontsize=10)
    fig.tight_layout()
    return f"<p>{_esc(summary)}</p>\n" + page.figure("finetune.png", fig, "fine-tuning curves")


def _section_proposals(page: _Page, cfg, run: Run) -> str:
    folder = run.root / STAGES["proposals"].folder
    found = {}
    for path in sorted(folder.glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = _read(path)
        except SppError:
            continue
        if manifest is not None:
            found[path.parent.name] = manifest
    lines = []
    if found:
        lines.append('<table class="num" id="proposals-data">\n<tr><th>split</th><th>images</th>'
                     '<th>boxes / image (mean)</th><th>median</th><th>recall@0.5</th><th>recall@0.7</th>'
                     '<th>GT boxes</th><th>all GT @0.5 / @0.7</th><th>wall time</th></tr>')
        for split, manifest in found.items():
            m = manifest.metrics
            lines.append(
                f"<tr><th>{_esc(split)}</th><td>{m.get('images', '-')}</td>"
                f"<td>{m.get('boxes_per_image_mean', 0):.0f}</td><td>{m.get('boxes_per_image_median', 0):.0f}</td>"
                f"<td>{_pct(m.get('recall@0.5'))}</td><td>{_pct(m.get('recall@0.7'))}</td>"
                f"<td>{m.get('gt_boxes', '-')}</td>"
                f"<td>{_pct(m.get('recall@0.5_all'))} / {_pct(m.get('recall@0.7_all'))}</td>"
                f"<td>{_esc(_duration(manifest.data.get('wall_time_s')))}</td></tr>")
        lines.append("</table>")
        lines.insert(0, "<p>Recall: the share of non-difficult ground-truth boxes that some proposal covers with "
                        "IoU at least 0.5 / 0.7.</p>")
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.test_split)):
        if split not in found:
            lines.append(page.missing(f"no proposals for {split} yet", run.command_for("proposals", split)))
    return "\n".join(lines)


def _section_times(page: _Page, run: Run, manifests: list[Manifest]) -> str:
    if not manifests:
        return page.missing("no stage has finished yet", run.command_for("pretrain", None))
    entries = []
    for m in manifests:
        tag = m.data.get("tag")
        entries.append((m.data.get("stage", "?"), tag or "", m.data.get("wall_time_s"), m.data.get("created", "")))
    total = sum(w for _, _, w, _ in entries if w)
    lines = ['<div class="two">', '<table class="num" id="times-data">\n<tr><th>stage</th><th>output</th>'
             '<th>wall time</th><th>share</th><th>finished</th></tr>']
    for stage, tag, wall, created in entries:
        share = f"{wall / total * 100:.0f}%" if wall and total else "-"
        lines.append(f"<tr><th>{_esc(stage)}</th><td class=\"tag\">{_esc(tag)}</td>"
                     f"<td>{_esc(_duration(wall))}</td><td>{share}</td><td class=\"dim\">{_esc(_date(created))}</td>"
                     "</tr>")
    lines.append(f'<tr class="total"><th>total</th><td></td><td>{_esc(_duration(total))}</td><td></td><td></td>'
                 "</tr>\n</table>")
    fig = _figure()
    fig.set_size_inches(5.6, 0.24 * len(entries) + 0.9)
    ax = fig.subplots()
    labels = [f"{stage} {tag}".strip() for stage, tag, _, _ in entries]
    walls = [w or 0.0 for _, _, w, _ in entries]
    stages = list(dict.fromkeys(stage for stage, _, _, _ in entries))
    colours = [f"C{stages.index(stage) % 10}" for stage, _, _, _ in entries]
    y = np.arange(len(entries))
    ax.barh(y, walls, color=colours)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"wall time per stage output (total {_duration(total)})", fontsize=10)
    fig.tight_layout()
    lines.append(page.figure("wall_times.png", fig, "wall time of every stage output"))
    lines.append("</div>")
    return "\n".join(lines)


def _section_detections(page: _Page, cfg, run: Run, table9: dict, max_images: int) -> str:
    from .core.voc import VocDataset

    best = _best_test_variant(table9)
    if best is None:
        tag = table9["tags"].get(("ftfc7 bb", list(table9["columns"])[-1]))
        return page.missing("no detections to draw: no variant evaluated yet", run.command_for("eval", tag))
    tag, mean_ap = best
    detect = _manifest(run, "detect", tag)
    if detect is None:
        return page.missing(f"no detections of {tag} (its detect output is gone)", run.command_for("detect", tag))
    with np.load(detect.output("detections"), allow_pickle=False) as npz:
        dets = {key: npz[key] for key in npz.files}
    try:
        dataset = VocDataset.from_config(cfg.data)
    except SppError as err:
        return page.missing(f"no test images to draw on: {err}")
    image_ids = [str(i) for i in dets["image_ids"]]
    classes = [str(c) for c in dets["classes"]]
    with_dets = sorted(set(int(i) for i in dets["image_index"]))
    if not with_dets:
        return page.missing(f"{tag} detected nothing on {len(image_ids)} images")
    picks = [with_dets[int(k)] for k in np.unique(np.linspace(0, len(with_dets) - 1, min(max_images,
                                                                                       len(with_dets))).round())]
    per_image = {i: np.flatnonzero(dets["image_index"] == i) for i in picks}
    per_image = {i: rows[np.argsort(-dets["score"][rows], kind="stable")] for i, rows in per_image.items()}
    pooled = np.sort(np.concatenate([dets["score"][rows[:MAX_PER_IMAGE]] for rows in per_image.values()]))[::-1]
    thresh = float(pooled[min(len(pooled), SHOW_PER_IMAGE * len(picks)) - 1])
    colours = _class_colours(classes)
    cards, problems = [], []
    for i in picks:
        rows = per_image[i]
        shown = [r for r in rows[:MAX_PER_IMAGE] if dets["score"][r] >= thresh] or list(rows[:1])
        image_id = image_ids[i]
        try:
            pixels = dataset.load_image(image_id)
            gt = dataset.annotation(image_id) if dataset.annotation_path(image_id).exists() else None
        except (SppError, OSError) as err:
            problems.append(f"{image_id}: {err}")
            continue
        fig = _draw_detections(pixels, [(classes[int(dets["label"][r])], float(dets["score"][r]), dets["boxes"][r])
                                        for r in shown], gt, dataset.classes, colours)
        img = page.figure(f"det_{_safe_name(image_id)}.png", fig, f"detections on {image_id}")
        cards.append(f"<figure>{img}<figcaption>{_esc(image_id)}: {len(shown)} of {len(rows)} detections"
                     "</figcaption></figure>")
    head = (f"<p>The best evaluated variant, <b>{_esc(tag)}</b> (mAP {mean_ap * 100:.1f}), on {len(cards)} of the "
            f"{len(image_ids)} {_esc(table9['split'])} images (spread over those with detections). Drawn: "
            f"detections scoring at least {thresh:.3g} (about the top {SHOW_PER_IMAGE} per image; at most "
            f"{MAX_PER_IMAGE}, and always an image's best), labelled class and score; ground truth dashed white."
            "</p>")
    out = [head, f'<div class="grid">{"".join(cards)}</div>']
    out += [page.missing(f"could not draw {p}") for p in problems]
    return "\n".join(out)


def _draw_detections(pixels: np.ndarray, shown: list, gt, gt_classes, colours: dict):
    from matplotlib.patches import Rectangle

    height, width = pixels.shape[:2]
    fig = _figure()
    side = 3.6
    fig.set_size_inches(side * width / max(width, height), side * height / max(width, height))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(pixels, interpolation="bilinear" if max(width, height) > 300 else "nearest")
    ax.set_axis_off()
    if gt is not None:
        for box in gt.boxes:
            x1, y1, x2, y2 = box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=1.0, ls="--"))
    for name, score, (x1, y1, x2, y2) in reversed(shown):  # lowest first, so the best is drawn on top
        colour = colours.get(name, "yellow")
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=2.0))
        inside = y1 < 0.08 * height  # no room above the box: the label goes just inside it
        ax.text(max(x1, 0) + 1, max(y1, 0) + (1 if inside else 0), f"{name} {score:.2f}", fontsize=8,
                va="top" if inside else "bottom", ha="left", color="black", clip_on=True,
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.2, "alpha": 0.9})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return fig


# -- helpers ------------------------------------------------------------------------------------------------------
def _figure():
    """A matplotlib figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    return fig


def _line(colour):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, lw=2)


def _unit_axes(ax) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])
    ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


def _date(stamp: str) -> str:
    """``2024-05-01T12:00:00+0200`` -> ``2024-05-01 12:00``."""
    return stamp[:16].replace("T", " ") if stamp else ""


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2330; background: #f6f7f9; margin: 0; }
header { background: #1f2a3c; color: #fff; padding: 18px 0 14px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #c9d2e3; font-size: 14px; }
header code { background: #33415a; color: #e8eefa; }
nav { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; }
nav a { color: #9fc3ff; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
section { background: #fff; border: 1px solid #e1e4ea; border-radius: 6px; margin: 18px 0; padding: 4px 20px 16px; }
h2 { font-size: 18px; margin: 14px 0 10px; padding-bottom: 6px; border-bottom: 1px solid #eceef2; }
p { margin: 6px 0 10px; }
code { font: 13px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f3f6;
       padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eceef2; text-align: left; vertical-align: top; }
tr:first-child th { background: #f1f3f6; font-weight: 600; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { color: #5a6477; font-weight: 500; white-space: nowrap; background: none; }
table.kv td { word-break: break-word; }
th.tag, td.tag { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
th.tag { text-align: right; min-width: 4.5em; }
table.num td.tag { text-align: left; }
td.best { font-weight: 700; color: #0b5bd3; }
tr.total th, tr.total td { border-top: 2px solid #c9ced8; font-weight: 600; }
.dim { color: #8a93a3; }
.warn { color: #a34a00; font-size: 13px; }
p.missing { background: #fff7e6; border-left: 4px solid #f0a020; padding: 6px 10px; color: #5b3d00; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; display: block; }
details { margin: 6px 0; }
summary { cursor: pointer; font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; padding: 3px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
figure { margin: 0; }
figure img { border: 1px solid #e1e4ea; border-radius: 4px; width: 100%; }
figcaption { font-size: 13px; color: #5a6477; margin-top: 4px; }
.two { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
.two > table { flex: 0 1 auto; }
.two > img { flex: 1 1 480px; min-width: 0; max-width: 640px; }
footer { color: #8a93a3; font-size: 12px; padding: 6px 0 30px; }
"""


def _document(cfg, body: list[str]) -> str:
    nav = " ".join(f'<a href="#{anchor}">{_esc(heading)}</a>' for anchor, heading in SECTIONS)
    title = f"sppnet run {cfg.run}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f'<header><div class="wrap"><h1>{_esc(title)}</h1>'
        f"<p>{_esc(cfg.data.dataset)} &middot; {_esc(cfg.model.backbone)} &middot; test split "
        f"{_esc(cfg.data.test_split)} &middot; written by <code>spp report</code></p>"
        f"<nav>{nav}</nav></div></header>",
        '<main class="wrap">',
        *body,
        "</main>",
        '<footer class="wrap">Self-contained: this page and the PNG files beside it; nothing is loaded from '
        "elsewhere.</footer>",
        "</body>",
        "</html>",
        "",
    ])
