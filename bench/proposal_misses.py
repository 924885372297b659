"""Which ground-truth objects a proposals file misses, by object size, and what recall the VOC protocol would give.

The `train`/`val` annotations of ../shared/voc2007 lost their `difficult` flags (its README), so recall measured on
them counts objects the official protocol leaves out, and those are mostly tiny: a box must be >= 20 px a side
(SPEC §3), so an object 12 px wide can hardly reach IoU 0.5. The official `test` annotations keep the flags; this
script takes P(difficult | shorter side) from them and weights the measured per-size recall with it, an estimate
of recall@0.5 over non-difficult objects (not a measurement: the true flags of these images are unknown).

    .venv/bin/python bench/proposal_misses.py RUN_DIR/01_proposals/val/proposals.h5 \
        --voc-root ../shared/voc2007/VOCdevkit [--flags-from test]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.errors import SppError  # noqa: E402
from stages.core.proposals import ProposalStore, best_overlaps  # noqa: E402
from stages.core.voc import VocDataset  # noqa: E402

SIDE_EDGES = (0, 10, 15, 20, 25, 32, 48, 64, 128, np.inf)  # shorter side of the object, pixels


def shorter_sides(boxes: np.ndarray) -> np.ndarray:
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("proposals", type=Path, help="a proposals.h5 written by `spp proposals`")
    parser.add_argument("--voc-root", type=Path, required=True)
    parser.add_argument("--flags-from", default="test", help="split whose difficult flags are real (default test)")
    args = parser.parse_args()
    dataset = VocDataset(args.voc_root)
    if not args.proposals.is_file():
        sys.exit(f"{args.proposals}: no such file (a proposals.h5 written by `spp proposals`)")

    best, sides, flagged = [], [], []
    try:
        store = ProposalStore(args.proposals)
    except SppError as exc:
        sys.exit(str(exc))
    with store:
        for image_id in store.image_ids:
            ann = dataset.annotation(image_id)
            best.append(best_overlaps(ann.boxes, store.boxes(image_id)))
            sides.append(shorter_sides(ann.boxes))
            flagged.append(ann.difficult)
    best, sides, flagged = map(np.concatenate, (best, sides, flagged))
    found = best >= 0.5
    print(f"{args.proposals}: {len(best)} objects ({int(flagged.sum())} flagged difficult), "
          f"recall@0.5 over all {found.mean():.3f}")

    reference = [dataset.annotation(image_id) for image_id in dataset.image_ids(args.flags_from)]
    ref_sides = np.concatenate([shorter_sides(a.boxes) for a in reference])
    ref_difficult = np.concatenate([a.difficult for a in reference])
    print(f"{args.flags_from}: {len(ref_sides)} objects, {ref_difficult.mean():.1%} difficult")
    print(f"{'shorter side':>14} {'objects':>8} {'recall':>7} {'P(difficult) in ' + args.flags_from:>22}")
    expected_found = expected_total = 0.0
    for lo, hi in zip(SIDE_EDGES[:-1], SIDE_EDGES[1:]):
        here = (sides >= lo) & (sides < hi)
        there = (ref_sides >= lo) & (ref_sides < hi)
        p_difficult = float(ref_difficult[there].mean()) if there.any() else 0.0
        expected_total += (1 - p_difficult) * here.sum()
        expected_found += (1 - p_difficult) * found[here].sum()
        recall = f"{found[here].mean():.3f}" if here.any() else "-"
        print(f"{f'{lo:g}-{hi:g} px':>14} {int(here.sum()):>8} {recall:>7} {p_difficult:>22.2f}")
    print(f"estimated recall@0.5 over non-difficult objects: {expected_found / expected_total:.3f}")


if __name__ == "__main__":
    main()
