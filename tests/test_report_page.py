"""``spp report``: one self-contained HTML page about a run, from a tiny run whose stage outputs are written here
(manifests through ``Run.write_manifest``, the evaluations by the real ``spp eval`` code), so it takes seconds."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_devkit
from sppcli.cli import cli
from stages import evaluate
from stages.core.artifacts import Run
from stages.core.config import build_config
from stages.core.runconfig import save_run_config
from stages.core.voc import write_comp4

CLASSES = ("red", "green")
# Written out here, not taken from stages.report_page: a section dropped from the page fails the test.
HEADINGS = ["Run", "Table 9", "Per-class AP", "Precision/recall curves", "Pretraining", "Fine-tuning",
            "Proposal recall", "Stage wall times", "Detections on test images"]
EVALUATED = {"test-ftfc7-s2-bb": ("ftfc7", False, True), "test-pool5-s1": ("pool5", True, False)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- a tiny run -----------------------------------------------------------------------------------------------------
def _devkit(root: Path) -> Path:
    rng = np.random.default_rng(3)
    images, objects = {}, {}
    for k in range(7):
        img = (rng.random((72, 96, 3)) * 60).astype(np.uint8)
        x, y = 8 + 3 * k, 6 + 2 * k
        img[y:y + 30, x:x + 36] = (200, 30, 30)
        img[50:68, 60:90] = (30, 200, 30)
        objects[f"im{k}"] = [("red", (x + 1, y + 1, x + 36, y + 30), False), ("green", (61, 51, 90, 68), False)]
        images[f"im{k}"] = (img, objects[f"im{k}"])
    return write_devkit(root, images, {"trainval": ["im0", "im1"], "test": [f"im{k}" for k in range(2, 7)]},
                        classes=CLASSES)


def _config(runs_root: Path, run: str, devkit: Path, **more):
    return build_config(overrides={"run": run, "runs_root": str(runs_root), "data.dataset": "voc2007",
                                   "data.voc_root": str(devkit), "features.scales": [96, 128],
                                   "features.one_scale": 128, "finetune.lr_steps": [20], **more})


def _files(run: Run, names: dict[str, bytes], stage: str, tag: str | None = None) -> Path:
    out = run.stage_dir(stage, tag)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (out / name).write_bytes(data)
    return out


def _pretrain(run: Run, epochs: int) -> None:
    _files(run, {"model.pt": b"weights"}, "pretrain")
    metrics = {"epochs": epochs, "num_classes": 2, "chance_accuracy": 0.5, "val_accuracy": 0.9 if epochs else 0.5,
               "val_loss": 0.3, "train_images": 40, "val_images": 10,
               "weights_from": "scratch" if epochs else "weights", "train_loss_per_epoch": [0.7, 0.5, 0.35][:epochs],
               "train_accuracy_per_epoch": [0.55, 0.75, 0.88][:epochs],
               "val_accuracy_per_epoch": [0.6, 0.8, 0.9][:epochs]}
    run.write_manifest("pretrain", None, config={}, inputs={}, outputs={"model": "model.pt"}, metrics=metrics,
                       wall_time_s=12.5)


def _proposals(run: Run, split: str):
    _files(run, {"proposals.h5": b"boxes"}, "proposals", split)
    return run.write_manifest("proposals", split, config={}, inputs={}, outputs={"proposals": "proposals.h5"},
                              metrics={"images": 5, "recall@0.5": 0.875, "recall@0.7": 0.625, "gt_boxes": 8,
                                       "recall@0.5_all": 0.875, "recall@0.7_all": 0.625, "boxes_per_image_mean": 80.0,
                                       "boxes_per_image_median": 80.0}, wall_time_s=3.25)


def _finetune(run: Run) -> None:
    history = [{"iteration": i, "lr": 0.01, "holdout_error": 0.5 / i ** 0.5, "holdout_loss": 1 / i ** 0.5,
                "train_loss": 1.2 / i ** 0.5, "train_error": 0.6 / i ** 0.5} for i in (6, 12, 18, 24)]
    _files(run, {"model.pt": b"ft", "history.json": json.dumps(history).encode()}, "finetune")
    run.write_manifest("finetune", None, config={}, inputs={}, outputs={"model": "model.pt", "history": "history.json"},
                       metrics={"iterations": 24, "initial_holdout_error": 0.9, "best_holdout_error": history[-1][
                           "holdout_error"], "best_iteration": 24, "train_images": 2, "holdout_images": 1},
                       wall_time_s=40.0)


def _detect(run: Run, devkit: Path, tag: str, proposals, jitter: int, seed: int) -> None:
    """Detections near every ground-truth box (scores 1.5 .. 0.2) and a few false ones, as spp detect writes them."""
    from stages.core.voc import VocDataset

    rng = np.random.default_rng(seed)
    dataset = VocDataset(devkit)
    ids = dataset.image_ids("test")
    per_class, rows = {c: [] for c in CLASSES}, []
    for index, image_id in enumerate(ids):
        ann = dataset.annotation(image_id)
        for box, label in zip(ann.boxes, ann.labels):
            found = box + rng.integers(-jitter, jitter + 1, 4)
            rows.append((index, int(label), float(rng.uniform(0.2, 1.5)), *found))
        rows.append((index, 0, float(rng.uniform(-1.4, -0.5)), 70.0, 5.0, 94.0, 30.0))  # a false "red"
    for index, label, score, *box in rows:
        per_class[CLASSES[label]].append((ids[index], score, np.array(box)))
    out = run.stage_dir("detect", tag)
    for name in CLASSES:
        write_comp4(out / "comp4", "test", name, per_class[name])
    table = np.array(rows, dtype=np.float64)
    np.savez(out / "detections.npz", image_ids=np.array(ids), classes=np.array(CLASSES),
             image_index=table[:, 0].astype(np.int64), label=table[:, 1].astype(np.int64), score=table[:, 2],
             boxes=table[:, 3:7])
    run.write_manifest("detect", tag, config={"tag": tag}, inputs={"proposals": proposals},
                       outputs={"comp4_dir": "comp4", "detections": "detections.npz"},
                       metrics={"images": len(ids), "detections": len(rows)}, wall_time_s=2.0)


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (outside ``skip``), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished tiny run (two variants evaluated by the real eval code) and its report, written by the CLI."""
    root = tmp_path_factory.mktemp("report")
    devkit = _devkit(root / "devkit")
    cfg = _config(root / "runs", "tiny", devkit)
    save_run_config(cfg)
    run = Run(cfg.run_dir)
    _pretrain(run, epochs=3)
    _proposals(run, "trainval")
    test_proposals = _proposals(run, "test")
    _finetune(run)
    plotted = []  # what spp eval titled its PR plots with
    real_plot = evaluate._pr_plot
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "_pr_plot", lambda result, name, metric: plotted.append(name) or real_plot(
            result, name, metric))
        for seed, (tag, (feature, one_scale, bbox)) in enumerate(EVALUATED.items()):
            _detect(run, devkit, tag, test_proposals, jitter=2 + 6 * seed, seed=seed)
            evaluate.run(dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, bbox=bbox)), "test",
                         feature=feature, one_scale=one_scale)
    before = _snapshot(run.root)
    result = CliRunner().invoke(cli, ["report", "--run", "tiny", "--runs-root", str(root / "runs")])
    assert result.exit_code == 0, result.output
    out = run.root / "report"
    return {"root": root, "devkit": devkit, "run": run, "out": out, "output": result.output, "before": before,
            "plotted": plotted, "page": _parse((out / "report.html").read_text())}


class _Page(HTMLParser):
    """Headings, images, links, table cells with a data-tag, the one-line notes and everything else of a page."""

    def __init__(self):
        super().__init__()
        self.h2, self.images, self.tagged, self.missing, self.tags_seen, self.hrefs = [], [], {}, [], set(), []
        self.tables: dict[str, list[list[str]]] = {}
        self.summaries, self.figcaptions = [], []
        self._text: list[str] | None = None
        self._where: tuple | None = None
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags_seen.add(tag)
        if tag == "img":
            self.images.append(attrs)
        if "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("h2", "td", "th", "p", "summary", "figcaption"):
            self._text, self._where = [], (tag, attrs)

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if self._where is None or tag != self._where[0]:
            return
        text = " ".join("".join(self._text).split())
        attrs = self._where[1]
        if tag == "h2":
            self.h2.append(text)
        elif tag in ("td", "th") and self._table:
            self.tables[self._table][-1].append(text)
            if "data-tag" in attrs:
                self.tagged[attrs["data-tag"]] = text
        elif tag == "p" and attrs.get("class") == "missing":
            self.missing.append(text)
        elif tag == "summary":
            self.summaries.append(text)
        elif tag == "figcaption":
            self.figcaptions.append(text)
        self._text, self._where = None, None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    page.text = text
    return page


def _png_dpi(data: bytes) -> float:
    """The resolution a PNG records (its pHYs chunk, pixels per metre), in dots per inch."""
    assert data[:8] == PNG_SIGNATURE
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs":
            ppu_x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            assert unit == 1  # metre
            return ppu_x * 0.0254
        pos += 12 + length
    raise AssertionError("no pHYs chunk")


def _report(root: Path, run: str, *more: str):
    return CliRunner().invoke(cli, ["report", "--run", run, "--runs-root", str(root / "runs"), *more])


# -- the full run ---------------------------------------------------------------------------------------------------
def test_every_section_and_every_image(tiny):
    page, out = tiny["page"], tiny["out"]
    assert page.h2 == HEADINGS
    assert not page.missing, page.missing  # every input is there: no "run X first" note
    assert len(page.images) >= 8
    for img in page.images:
        src = img["src"]
        assert "/" not in src and ":" not in src, src  # relative, beside the page
        data = (out / src).read_bytes()
        assert data[:8] == PNG_SIGNATURE, src
        assert _png_dpi(data) >= 110, src
        assert img.get("alt"), src
    names = {img["src"] for img in page.images}
    assert {"pretrain.png", "finetune.png", "wall_times.png", "pr_overview.png"} <= names
    assert {f"pr_{tag}.png" for tag in EVALUATED} <= names
    drawn = sorted(n for n in names if n.startswith("det_"))
    assert drawn == [f"det_im{k}.png" for k in range(2, 7)]  # all 5 test images (4-6 are shown)
    assert all("detections" in caption for caption in page.figcaptions)
    # self-contained: no scripts, no stylesheets or images from elsewhere, only in-page links
    assert not {"script", "link", "iframe"} & page.tags_seen
    assert all(href.startswith("#") for href in page.hrefs), page.hrefs
    assert "http://" not in page.text and "https://" not in page.text and "<style>" in page.text
    assert f"written: {out / 'report.html'}" in tiny["output"]


def test_table9_and_per_class_ap_equal_the_eval_metrics(tiny):
    page, run = tiny["page"], tiny["run"]
    metrics = {tag: json.loads((run.stage_dir("eval", tag) / "metrics.json").read_text()) for tag in EVALUATED}
    assert metrics["test-ftfc7-s2-bb"]["mAP"] != metrics["test-pool5-s1"]["mAP"]  # distinguishable numbers
    for tag, m in metrics.items():
        assert page.tagged[tag] == f"{m['mAP'] * 100:.1f}", tag
    shown = [tag for tag, text in page.tagged.items() if text != "-"]
    assert sorted(shown) == sorted(EVALUATED)
    assert len(page.tagged) == 8  # the paper's four rows x 1-scale / 2-scale
    # per-class AP: variants as columns, classes as rows, then mAP
    table = page.tables["per-class-data"]
    header = table[0][1:]
    assert header == ["test-pool5-s1", "test-ftfc7-s2-bb"]  # in Table 9's order
    for row in table[1:]:
        name, cells = row[0], row[1:]
        for tag, cell in zip(header, cells):
            value = metrics[tag]["mAP"] if name == "mAP" else metrics[tag]["ap"][name]
            assert cell == f"{value * 100:.1f}", (name, tag)
    assert [row[0] for row in table[1:]] == [*CLASSES, "mAP"]


def test_pr_curves_are_named_by_variant(tiny):
    page, run = tiny["page"], tiny["run"]
    for tag in EVALUATED:
        mean_ap = json.loads((run.stage_dir("eval", tag) / "metrics.json").read_text())["mAP"]
        assert f"{tag}: mAP {mean_ap * 100:.1f}" in page.summaries
    # spp eval's own PR plot: titled with the variant's tag, not the split, and sharp enough
    assert tiny["plotted"] == list(EVALUATED)
    for tag in EVALUATED:
        assert _png_dpi((run.stage_dir("eval", tag) / "pr_curves.png").read_bytes()) >= 110
    assert evaluate.pr_plot_title("test-ftfc7-s1-bb", "voc07", 0.3211) == "test-ftfc7-s1-bb: voc07 mAP 32.1"


def test_training_proposals_and_times(tiny):
    page, run = tiny["page"], tiny["run"]
    proposals = page.tables["proposals-data"]
    assert [row[0] for row in proposals[1:]] == ["test", "trainval"]
    assert proposals[1][4:6] == ["87.5%", "62.5%"]  # recall@0.5, @0.7
    times = page.tables["times-data"]
    manifests = sorted(run.root.glob("*/MANIFEST.json")) + sorted(run.root.glob("*/*/MANIFEST.json"))
    assert len(times) - 2 == len(manifests)  # one row each, between the header and the total
    total = sum(json.loads(p.read_text())["wall_time_s"] for p in manifests)
    minutes, seconds = divmod(round(total), 60)
    assert total > 60 and times[-1][0] == "total" and times[-1][2] == f"{minutes}m {seconds:02d}s"
    assert "3 epoch(s)" in page.text and "final val accuracy 90.0%" in page.text
    assert f"best {50 / 24 ** 0.5:.1f}% at iteration 24" in page.text  # fine-tuning summary from the manifest


def test_the_run_is_left_as_it_was(tiny):
    """Only the out folder is new; every file of the run is byte-identical, and an --out elsewhere adds nothing."""
    run = tiny["run"]
    assert _snapshot(run.root, skip=tiny["out"]) == tiny["before"]
    elsewhere = tiny["root"] / "elsewhere"
    result = _report(tiny["root"], "tiny", "--out", str(elsewhere))
    assert result.exit_code == 0, result.output
    assert _snapshot(run.root, skip=tiny["out"]) == tiny["before"]
    assert (elsewhere / "report.html").read_text().count("<h2>") == len(HEADINGS)


def test_an_unusable_out_is_one_line(tiny):
    blocker = tiny["root"] / "a_file"
    blocker.write_text("x")
    result = _report(tiny["root"], "tiny", "--out", str(blocker / "report"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "cannot write here" in result.output and str(blocker) in result.output
    # a stage folder of the run is not a place for the page either
    inside = tiny["run"].stage_dir("eval", "test-pool5-s1")
    result = _report(tiny["root"], "tiny", "--out", str(inside))
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "choose another --out" in result.output
    assert not (inside / "report.html").exists()
    result = _report(tiny["root"], "no-such-run")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "nothing to report" in result.output


# -- a partial run ------------------------------------------------------------------------------------------------
def test_a_partial_run_says_what_to_run(tiny):
    """Pretrained (no epochs: an ImageNet trunk) with trainval proposals only: each missing section is one line
    naming the command that makes its input, and the page still has every section."""
    root = tiny["root"]
    cfg = _config(root / "runs", "partial", tiny["devkit"], **{"model.backbone": "mobilenet_v2",
                                                               "model.weights": "/weights/mnv2.pt"})
    save_run_config(cfg)
    run = Run(cfg.run_dir)
    _pretrain(run, epochs=0)
    _proposals(run, "trainval")
    before = _snapshot(run.root)
    result = _report(root, "partial")
    assert result.exit_code == 0, result.output
    page = _parse((run.root / "report" / "report.html").read_text())
    assert page.h2 == HEADINGS
    rr = f"--run partial --runs-root {root / 'runs'}"
    expected = [
        f"no variant evaluated yet: run spp eval {rr} --split test --feature ftfc7 --bbox",
        f"no PR curves: no variant evaluated yet: run spp eval {rr} --split test --feature ftfc7 --bbox",
        "no pretraining epochs (ImageNet trunk: /weights/mnv2.pt)",
        f"not fine-tuned yet: run spp finetune {rr}",
        f"no proposals for test yet: run spp proposals {rr} --split test",
        f"no detections to draw: no variant evaluated yet: run spp eval {rr} --split test --feature ftfc7 --bbox",
    ]
    assert page.missing[0] == expected[0]  # Table 9
    assert page.missing[1:] == [expected[0], *expected[1:]]  # per-class AP, then the rest in page order
    for note in expected:
        head, _, command = note.partition(": run ")
        assert f"not shown: {head}" + (f": run `{command}`" if command else "") + "\n" in result.output
    assert {img["src"] for img in page.images} == {"wall_times.png"}
    assert _snapshot(run.root, skip=run.root / "report") == before
