"""What a run's top detections hit: the analysis behind README's note on box regression.

For each class, the 2 x (number of non-difficult objects) highest-scoring detections of a variant are sorted into
- correct: IoU >= 0.5 with an object of the class,
- localisation: IoU 0.1-0.5 with an object of the class (what box regression can fix),
- other class: IoU >= 0.1 with an object of another class only,
- background: the rest.
Prints the shares over all classes, and per class with ``--per-class``; ``--json FILE`` writes the counts.

    .venv/bin/python bench/detection_errors.py data/runs/synth test-ftfc7-s1 test-ftfc7-s1-bb [--voc-root data/synth]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.boxes import box_iou  # noqa: E402
from stages.core.voc import VocDataset  # noqa: E402

KINDS = ("correct", "localisation", "other class", "background")


def breakdown(dataset: VocDataset, detections: Path) -> dict[str, collections.Counter]:
    """Per class name, how many of its top detections fall in each of ``KINDS``."""
    data = np.load(detections)
    image_ids = [str(i) for i in data["image_ids"]]
    annotations = {image_id: dataset.annotation(image_id) for image_id in image_ids}
    per_class: dict[str, collections.Counter] = {}
    for k, name in enumerate(dataset.classes):
        counts = per_class[name] = collections.Counter()
        rows = np.flatnonzero(data["label"] == k)
        objects = sum(int(((a.labels == k) & ~a.difficult).sum()) for a in annotations.values())
        for row in rows[np.argsort(-data["score"][rows], kind="stable")][:2 * objects]:
            ann = annotations[image_ids[int(data["image_index"][row])]]
            box = data["boxes"][row][None]
            same = ann.boxes[ann.labels == k]
            iou_same = box_iou(box, same).max() if len(same) else 0.0
            iou_any = box_iou(box, ann.boxes).max() if len(ann.boxes) else 0.0
            counts["correct" if iou_same >= 0.5 else "localisation" if iou_same >= 0.1
                   else "other class" if iou_any >= 0.1 else "background"] += 1
    return per_class


def shares(counts: collections.Counter) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name} {counts[name] / max(total, 1):.0%}" for name in KINDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory, e.g. data/runs/synth")
    parser.add_argument("variants", nargs="+", help="06_detect folders, e.g. test-ftfc7-s1-bb")
    parser.add_argument("--voc-root", type=Path, default=Path("data/synth"))
    parser.add_argument("--per-class", action="store_true", help="also one line per class")
    parser.add_argument("--json", type=Path, help="write {variant: {class: {kind: count}}} here")
    args = parser.parse_args()
    dataset = VocDataset(args.voc_root)
    report = {}
    for variant in args.variants:
        path = args.run / "06_detect" / variant / "detections.npz"
        if not path.is_file():
            sys.exit(f"{path}: no such file (run `spp detect` for variant {variant} first)")
        per_class = breakdown(dataset, path)
        total = sum(per_class.values(), collections.Counter())
        print(f"{variant}: {sum(total.values())} detections: {shares(total)}")
        if args.per_class:
            width = max(len(name) for name in per_class)
            for name, counts in per_class.items():
                print(f"  {name:<{width}}  {sum(counts.values()):>5}  {shares(counts)}")
        report[variant] = {name: {kind: counts[kind] for kind in KINDS} for name, counts in per_class.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
