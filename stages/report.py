"""``spp table9``: the paper's Table 9 rows for this run, from the eval manifests of its variants."""
from __future__ import annotations

from pathlib import Path

from .core.artifacts import Run, atomic_write_json, read_manifest
from .core.registry import detect_tag

# (row label, SVM feature, box regression) in the paper's Table 9 order; "fc7" is without fine-tuning.
TABLE9_ROWS = (("pool5", "pool5", False), ("fc7", "fc7", False), ("ftfc7", "ftfc7", False),
               ("ftfc7 bb", "ftfc7", True))
# Beyond the paper, shown when evaluated: the fine-tuned fc8's softmax as the scorer, no SVMs (Fast R-CNN).
EXTRA_ROWS = (("softmax", "softmax", False), ("softmax bb", "softmax", True))
# The paper's VOC07 test mAPs for SPP ZF-5 (SPEC §8; the fc7 and ftfc7 rows are remembered, not verified).
PAPER = {"pool5": (43.0, 44.9), "fc7": (None, None), "ftfc7": (54.5, 55.2), "ftfc7 bb": (58.0, 59.2),
         "softmax": (None, None), "softmax bb": (None, None)}


def table9_data(cfg) -> dict:
    """Table 9 as data, from the run's eval manifests (it only reads the run): ``columns`` maps a column name
    ("1-scale", "5-scale") to whether it is the 1-scale setting; ``rows`` maps a row label to {column: None (not
    evaluated) or {"mAP", "ap" (per class), "eval" (its manifest)}}; ``tags`` maps (label, column) to the variant's
    tag; ``missing`` lists the tags not evaluated yet; ``paper`` the paper's values of the rows shown."""
    run = Run(cfg.run_dir)
    split = cfg.data.test_split
    n_scales = len(cfg.features.scales)
    columns = {"1-scale": True} | ({f"{n_scales}-scale": False} if n_scales > 1 else {})
    rows, missing, tags = {}, [], {}
    for label, feature, bbox in TABLE9_ROWS + EXTRA_ROWS:
        row, row_missing = {}, []
        for column, one_scale in columns.items():
            tag = tags[label, column] = detect_tag(split, feature, one_scale, n_scales, bbox)
            path = run.manifest_path("eval", tag)
            try:
                manifest = read_manifest(path)
            except FileNotFoundError:
                row_missing.append(tag)
                row[column] = None
                continue
            row[column] = {"mAP": manifest.metrics["mAP"], "ap": manifest.metrics.get("ap", {}), "eval": str(path)}
        if (label, feature, bbox) in EXTRA_ROWS and not any(row.values()):
            continue  # a row beyond the paper that this run did not evaluate
        rows[label] = row
        missing += row_missing
    return {"run": cfg.run, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone, "split": split,
            "scales": list(cfg.features.scales), "one_scale": cfg.features.one_scale, "columns": columns,
            "rows": rows, "tags": {key: tag for key, tag in tags.items() if key[0] in rows},
            "paper": {label: PAPER[label] for label in rows}, "missing": missing}


def table9(cfg, json_out: Path | None = None) -> str:
    """Collect the eight variants' mAPs and return the printed table; with ``json_out``, also write them there.
    It only reads the run (so it works on a read-only one)."""
    data = table9_data(cfg)
    split, columns, rows, missing = data["split"], data["columns"], data["rows"], data["missing"]
    lines = [f"Table 9 for run '{cfg.run}' ({cfg.data.dataset}, {cfg.model.backbone}, split {split}): VOC07 mAP (%)",
             f"{'SVM on':<10}" + "".join(f"{c:>10}" for c in columns)
             + "   paper (ZF-5, VOC07 test, 1/5-scale)"]
    for label, row in rows.items():
        cells = "".join(f"{row[c]['mAP'] * 100:>10.1f}" if row[c] else f"{'-':>10}" for c in columns)
        paper = "/".join("-" if v is None else f"{v:.1f}" for v in PAPER[label])
        lines.append(f"{label:<10}{cells}   {paper}")
    if missing:
        lines.append(f"missing (not evaluated yet): {', '.join(missing)}")
    last = list(columns)[-1]
    shown = "ftfc7 bb" if rows["ftfc7 bb"].get(last) else max(
        (label for label, row in rows.items() if row.get(last)), key=lambda k: rows[k][last]["mAP"], default=None)
    if shown:
        lines.append(f"per-class AP ({shown}, {last}): "
                     + ", ".join(f"{k} {v * 100:.1f}" for k, v in rows[shown][last]["ap"].items()))
    if json_out is None:
        return "\n".join(lines)
    out = Path(json_out)
    atomic_write_json(out, {"run": cfg.run, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone,
                            "split": split, "scales": list(cfg.features.scales), "one_scale": cfg.features.one_scale,
                            "rows": rows, "paper": {label: PAPER[label] for label in rows}, "missing": missing})
    lines.append(f"written: {out}")
    return "\n".join(lines)
