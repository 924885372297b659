"""What fc compression (``detect.fc_compression``: svd, int8) costs in mAP and saves in fc time, on a finished run.

For each variant, in a scratch run of its own under ``--work`` (the source run's stage folders linked, never
written), it detects and evaluates the split twice:

- **as is**: the run's SVMs, trained on exact fc features, score the compressed features (Fast R-CNN's way: no
  retraining);
- **retrained**: ``spp train-svm --fc-compression ...`` first learns the SVMs on the compressed features that
  detect then computes (SVM scorers only: the softmax scorer has nothing to retrain).

The exact row (``none``) is detected the same way, so all rows share one code path and one machine state. Prints
one table (mAP, change against exact, fc and detect seconds per image from detect's profile, train-svm seconds)
and writes it with ``--json``.

    .venv/bin/python bench/fc_compression.py data/runs/synth --split test --feature ftfc7 --one-scale --bbox \\
        --variant int8 --variant svd --variant svd:512,1024 --work /tmp/fc --json fc_synth.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.core.artifacts import Run, read_manifest  # noqa: E402
from stages.core.config import config_from_run  # noqa: E402
from stages.core.registry import SCORERS, STAGES, detect_tag, svm_tag  # noqa: E402

# Stage folders a variant run writes itself; every other one is a link to the source run's.
WRITTEN = (STAGES["svm"].folder, STAGES["detect"].folder, STAGES["eval"].folder)


MARKER = ".fc_compression_scratch"  # in every run folder this script made: the only folders it deletes


def parse_variant(text: str) -> tuple[str, str, list[int] | None]:
    """``none`` | ``int8`` | ``svd`` | ``svd:R6,R7`` -> (name, compression, ranks or None for the run's)."""
    method, colon, ranks = text.partition(":")
    if method not in ("none", "int8", "svd") or (colon and method != "svd"):
        raise argparse.ArgumentTypeError(f"expected none, int8, svd or svd:R6,R7, got {text!r}")
    if not colon:
        return method, method, None
    try:
        r6, r7 = (int(part) for part in ranks.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected svd:R6,R7 with two integers, got {text!r}") from None
    if min(r6, r7) < 1:
        raise argparse.ArgumentTypeError(f"svd ranks must be positive, got {text!r}")
    return f"svd-{r6}-{r7}", method, [r6, r7]


def variant_run(source: Path, work: Path, name: str, keep_svms: bool) -> Path:
    """A fresh run folder ``work/name`` whose stage folders link to ``source``'s, except the ones it writes:
    the SVM folder is a copy (``keep_svms``: the run's SVMs) or empty (they are retrained)."""
    run = work / name
    if run.exists():
        if not (run / MARKER).is_file():
            raise SystemExit(f"error: {run} exists and was not made by this script; choose another --work")
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / MARKER).touch()
    for entry in source.iterdir():
        if entry.name not in WRITTEN and entry.is_dir():
            (run / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        elif entry.is_file():
            shutil.copy2(entry, run / entry.name)
    svm_folder = source / STAGES["svm"].folder
    if keep_svms and svm_folder.is_dir():
        shutil.copytree(svm_folder, run / svm_folder.name)
    return run


def svm_fingerprint(run: Path, args) -> str:
    """The fingerprint of the run's SVMs for ``args``'s variant (their manifest's)."""
    n_scales = len(config_from_run(run).features.scales)
    tag = svm_tag(args.feature, args.one_scale, n_scales)
    return read_manifest(Run(run).manifest_path("svm", tag)).fingerprint


def spp(python: str, *args: str) -> float:
    """Runs one ``spp`` command (output passed through); its wall seconds."""
    print("$ spp " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([python, "-m", "sppcli", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def measure(args, name: str, compression: str, ranks: list[int] | None, retrain: bool) -> dict:
    label = f"{name}-{'retrained' if retrain else 'as-is'}" if compression != "none" else "exact"
    run = variant_run(args.run, args.work, label, keep_svms=not retrain)
    common = ["--run", label, "--runs-root", str(args.work), "--device", args.device,
              *(f"--set={item}" for item in args.set)]
    variant = ["--feature", args.feature, *(["--one-scale"] if args.one_scale else [])]
    bbox = "--bbox" if args.bbox else "--no-bbox"
    fc = ["--fc-compression", compression, *(["--fc-svd-ranks", ",".join(map(str, ranks))] if ranks else [])]
    svm_seconds = None
    if args.feature != "softmax" and (retrain or compression == "none"):
        svm_seconds = spp(args.python, "train-svm", *common, *variant, *fc)
        if compression == "none" and svm_fingerprint(run, args) != svm_fingerprint(args.run, args):
            # up to date, train-svm skips itself; it fitted anew: the run's SVMs are stale for this code or config
            raise SystemExit(f"error: the SVMs of {args.run} are not up to date (train-svm refitted them in {run}), "
                             "so the as-is rows would not use the SVMs the exact row uses; run spp train-svm there "
                             "first")
    detect_seconds = spp(args.python, "detect", *common, "--split", args.split, *variant, bbox, *fc)
    spp(args.python, "eval", *common, "--split", args.split, *variant, bbox)
    cfg = config_from_run(run)
    tag = detect_tag(args.split, args.feature, args.one_scale, len(cfg.features.scales), args.bbox)
    metrics = read_manifest(Run(run).manifest_path("eval", tag)).metrics
    prof = read_manifest(Run(run).manifest_path("detect", tag)).metrics["profile"]
    return {"variant": name, "compression": compression, "svd_ranks": list(cfg.detect.fc_svd_ranks)
            if compression == "svd" else None, "svms": "retrained" if retrain else "as is", "run": str(run),
            "mAP": metrics["mAP"], "ap": metrics["ap"], "fc_s_per_image": prof["per_image"].get("fc"),
            "detect_s_per_image": prof["per_image_s"], "detect_wall_s": detect_seconds,
            "train_svm_wall_s": svm_seconds, "tag": tag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished run (its SVMs, or fine-tuned net for softmax)")
    parser.add_argument("--split", required=True, help="the split to detect and evaluate")
    parser.add_argument("--feature", default="ftfc7", choices=[f for f in SCORERS if f != "pool5"],
                        help="a scorer that runs fc6/fc7 (pool5 has nothing to compress)")
    parser.add_argument("--one-scale", action="store_true", help="score each window at its one best scale")
    parser.add_argument("--bbox", action=argparse.BooleanOptionalAction, default=False, help="box regression")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="none | int8 | svd (the run's detect.fc_svd_ranks) | svd:R6,R7; repeatable")
    parser.add_argument("--no-retrain", action="store_true", help="only the as-is rows")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the variant runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key for every spp command (repeatable), e.g. detect.test_flip=false")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs spp")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    args.run, args.work = args.run.resolve(), args.work.resolve()
    if not (args.run / "config.json").is_file():
        parser.error(f"{args.run}: not a run directory (no config.json)")
    if args.work.is_relative_to(args.run) or args.run.is_relative_to(args.work):
        parser.error(f"--work {args.work} must lie outside the run {args.run}, and not hold it")

    rows = [measure(args, "none", "none", None, retrain=False)]
    for name, compression, ranks in args.variant:
        if compression == "none":
            continue
        rows.append(measure(args, name, compression, ranks, retrain=False))
        if args.feature != "softmax" and not args.no_retrain:
            rows.append(measure(args, name, compression, ranks, retrain=True))

    exact = rows[0]
    for row in rows:
        row["mAP_change"] = row["mAP"] - exact["mAP"]
    print(f"\nfc compression on {args.run.name}, {exact['tag']} ({len(exact['ap'])} classes):")
    print(f"  {'fc6/fc7':<16}{'SVMs':<11}{'mAP':>7}{'change':>8}{'fc s/img':>10}{'detect s/img':>14}"
          f"{'train-svm s':>13}")
    for row in rows:
        ranks = f" {row['svd_ranks'][0]}/{row['svd_ranks'][1]}" if row["svd_ranks"] else ""
        svm = "-" if row["train_svm_wall_s"] is None else f"{row['train_svm_wall_s']:.0f}"
        fc = "-" if row["fc_s_per_image"] is None else f"{row['fc_s_per_image']:.4f}"
        print(f"  {row['compression'] + ranks:<16}{row['svms'] if row is not exact else '-':<11}"
              f"{100 * row['mAP']:>7.2f}{100 * row['mAP_change']:>+8.2f}{fc:>10}"
              f"{row['detect_s_per_image']:>14.4f}{svm:>13}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "split": args.split, "feature": args.feature,
                                         "one_scale": args.one_scale, "bbox": args.bbox, "rows": rows}, indent=1))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
