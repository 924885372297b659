"""Do a run's box regressors generalise? Apply them to another split's windows and compare IoU before / after.

train-bbox reports the IoU of its *training* windows before and after regression (in-sample). This applies the
same regressors (``05_bbox/<tag>/bbox.npz``) to the windows of another split (default ``test``) that overlap a
ground-truth box by IoU > ``bbox.min_iou`` (the selection of training, less the ground-truth rows), pooled at the
same scales from that split's conv5 cache, and prints the mean IoU with the ground truth before and after, overall
and by IoU band.

    .venv/bin/python bench/bbox_generalisation.py data/runs/synth [--tag s5] [--split test] [--voc-root data/synth]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import train_bbox  # noqa: E402
from stages.core import boxes as box_ops  # noqa: E402
from stages.core import fcfeatures  # noqa: E402
from stages.core.artifacts import Run  # noqa: E402
from stages.core.bboxreg import load_bbox_model, predict_deltas  # noqa: E402
from stages.core.config import config_from_run  # noqa: E402
from stages.core.features import cache_of  # noqa: E402
from stages.core.proposals import load_proposals  # noqa: E402
from stages.core.roidb import build_roidb  # noqa: E402
from stages.core.voc import VocDataset, resolve_voc_root  # noqa: E402

BANDS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 1.01))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory, e.g. data/runs/synth")
    parser.add_argument("--tag", default="s5", help="05_bbox folder: s1, s5, s5+ftconv ... (default s5)")
    parser.add_argument("--split", default="test", help="split whose windows are regressed (default test)")
    parser.add_argument("--voc-root", type=Path, default=None, help="default: the run's data.voc_root")
    args = parser.parse_args()

    run = Run(args.run)
    cfg = config_from_run(args.run)
    dataset = VocDataset(args.voc_root or resolve_voc_root(cfg.data.dataset, cfg.data.voc_root))
    model = load_bbox_model(run.stage_dir("bbox", args.tag) / train_bbox.BBOX_FILE)
    cache = cache_of(run.require("features", args.split))
    proposals = load_proposals(run, args.split)
    before, after = [], []
    for image_id in dataset.image_ids(args.split):
        rois = build_roidb(dataset, args.split, proposals, image_ids=[image_id])[0]
        rows, gt_boxes, labels, _ = train_bbox.regression_samples(rois, model.min_iou)
        proposal_rows = ~rois.is_gt[rows]  # training also regresses the GT boxes themselves; a test has none
        rows, gt_boxes, labels = rows[proposal_rows], gt_boxes[proposal_rows], labels[proposal_rows]
        if len(rows) == 0:
            continue
        maps = fcfeatures.load_maps(cache, image_id, model.scales)
        features = fcfeatures.pool_windows(maps, rois.boxes[rows], model.pyramid,
                                           rule=cfg.features.scale_rule).cpu().numpy()
        for k in np.unique(labels):
            sel = labels == k
            boxes = rois.boxes[rows[sel]]
            moved = box_ops.apply_bbox_deltas(boxes, predict_deltas(model, int(k), features[sel]))
            before.append(box_ops.paired_iou(boxes, gt_boxes[sel]))
            after.append(box_ops.paired_iou(moved, gt_boxes[sel]))
    if not before:
        sys.exit(f"{args.split}: no window overlaps a ground-truth box by IoU > {model.min_iou}")
    b, a = np.concatenate(before), np.concatenate(after)
    print(f"{args.run} {args.tag} (lambda {model.lam:g}) on {args.split}: {len(b)} windows with IoU > "
          f"{model.min_iou:g}; mean IoU {b.mean():.3f} -> {a.mean():.3f}")
    for low, high in BANDS:
        sel = (b >= low) & (b < high)
        if sel.any():
            print(f"  IoU {low:.1f}-{min(high, 1.0):.1f}: {int(sel.sum()):6d} windows, {b[sel].mean():.3f} -> "
                  f"{a[sel].mean():.3f}")


if __name__ == "__main__":
    main()
