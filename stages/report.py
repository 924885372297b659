"""``spp table9``: the paper's Table 9 rows for this run, from the eval manifests of its variants."""
from __future__ import annotations

from pathlib import Path

from .core.artifacts import Run, atomic_write_json, read_manifest
from .core.registry import detect_tag

# (row label, SVM feature, box regression) in the paper's Table 9 order; "fc7" is without fine-tuning.
TABLE9_ROWS = (("pool5", "pool5", False), ("fc7", "fc7", False), ("ftfc7", "ftfc7", False),
               ("ftfc7 bb", "ftfc7", True))
# The paper's VOC07 test mAPs for SPP ZF-5 (SPEC §8; the fc7 and ftfc7 rows are remembered, not verified).
PAPER = {"pool5": (43.0, 44.9), "fc7": (None, None), "ftfc7": (54.5, 55.2), "ftfc7 bb": (58.0, 59.2)}


def table9(cfg, json_out: Path | None = None) -> str:
    """Collect the eight variants' mAPs and return the printed table; with ``json_out``, also write them there.
    It only reads the run (so it works on a read-only one)."""
    run = Run(cfg.run_dir)
    split = cfg.data.test_split
    n_scales = len(cfg.features.scales)
    rows, missing = {}, []
    for label, feature, bbox in TABLE9_ROWS:
        rows[label] = {}
        for one_scale, column in ((True, "1-scale"), (False, f"{n_scales}-scale")):
            tag = detect_tag(split, feature, one_scale, n_scales, bbox)
            path = run.manifest_path("eval", tag)
            try:
                manifest = read_manifest(path)
            except FileNotFoundError:
                missing.append(tag)
                rows[label][column] = None
                continue
            rows[label][column] = {"mAP": manifest.metrics["mAP"], "ap": manifest.metrics.get("ap", {}),
                                   "eval": str(path)}
    columns = ["1-scale", f"{n_scales}-scale"]
    lines = [f"Table 9 for run '{cfg.run}' ({cfg.data.dataset}, {cfg.model.backbone}, split {split}): VOC07 mAP (%)",
             f"{'SVM on':<10}" + "".join(f"{c:>10}" for c in columns) + "   paper (ZF-5, VOC07 test, 1/5-scale)"]
    for label, _, _ in TABLE9_ROWS:
        cells = "".join(f"{rows[label][c]['mAP'] * 100:>10.1f}" if rows[label][c] else f"{'-':>10}" for c in columns)
        paper = "/".join("-" if v is None else f"{v:.1f}" for v in PAPER[label])
        lines.append(f"{label:<10}{cells}   {paper}")
    if missing:
        lines.append(f"missing (not evaluated yet): {', '.join(missing)}")
    best = rows["ftfc7 bb"].get(columns[1])
    if best:
        lines.append(f"per-class AP (ftfc7 bb, {columns[1]}): "
                     + ", ".join(f"{k} {v * 100:.1f}" for k, v in best["ap"].items()))
    if json_out is None:
        return "\n".join(lines)
    out = Path(json_out)
    atomic_write_json(out, {"run": cfg.run, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone,
                            "split": split, "scales": list(cfg.features.scales), "one_scale": cfg.features.one_scale,
                            "rows": rows, "paper": PAPER, "missing": missing})
    lines.append(f"written: {out}")
    return "\n".join(lines)
