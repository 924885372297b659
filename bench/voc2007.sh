#!/usr/bin/env bash
# The whole SPP-net pipeline on a VOCdevkit folder, one stage after another, with the wall time of every stage:
# proposals (train + test split), pretrain, extract-features (train + test), finetune, train-svm (ftfc7),
# train-bbox, detect (with box regression), eval. Prints per-class AP, mAP and a stage-time table, and writes
# them to <runs-root>/<run>/bench_voc2007.json. Stages that are already up to date skip themselves, so a rerun
# (or a rerun after an interruption) only does what is missing.
#
#   bench/voc2007.sh VOCDEVKIT [options]
#
#   VOCDEVKIT             the folder that holds VOC2007/ (e.g. /work/shared/voc2007/VOCdevkit)
#   --backbone B          mobilenet_v2 (default: preset voc2007-mobilenet, ImageNet trunk from a local file,
#                         no classification pretraining: `spp pretrain --epochs 0` adds fresh fc layers)
#                         | zf5 (preset voc2007-zf5, from scratch: `spp data crops` cuts the train split's
#                         ground-truth objects into an ImageFolder set and `spp pretrain` trains on it)
#   --scales N            1 (default: features.one_scale) or the preset's number of scales (5: the paper's)
#   --device D            auto | cpu | cuda (default auto)
#   --train SPLIT         split to train on (default train)
#   --test SPLIT          split to evaluate on (default val)
#   --run NAME            run name (default voc07-<backbone>-s<N>)
#   --runs-root DIR       where runs live (default data/runs in the repository)
#   --weights FILE        trunk weights (default for mobilenet_v2: ../shared/weights/mobilenet_v2_imagenet_features.pt
#                         relative to the repository, or $SPP_MOBILENET_WEIGHTS)
#   --crops DIR           ZF-5's classification set (default <runs-root>/<run>/crops; reused when up to date)
#   --proposals-from F    precomputed proposals (.h5 boxes/<id>, e.g. another run's proposals.h5, .npz or .mat)
#                         for both splits; SPLIT=F (repeatable) gives one split its own file; other splits
#                         run selective search
#   --dataset D           voc2007 (default) | synth (a devkit written by `spp data synth`)
#   --set KEY=VALUE       any config key, passed to every stage (repeatable; e.g. --set finetune.iters=500)
#
# On a CPU budget (README, "Measured on /work/shared/voc2007"): --set model.fc_dim=1024, a few thousand
# finetune.iters, and for weak features (ZF-5 from scratch) --set svm.tol=0.1, liblinear's own default: with
# the preset's 1e-4 its SVMs ran over 41 minutes on the 500 train images, with 0.1 in 12.
#
# Env: PY (default .venv/bin/python of the repository).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench/voc2007.sh: $*" >&2; exit 2; }
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
VOC="" BACKBONE=mobilenet_v2 N_SCALES=1 DEVICE=auto TRAIN=train TEST=val RUN="" RUNS_ROOT="" WEIGHTS=""
CROPS="" DATASET=voc2007
PROPOSALS_ALL="" USER_SETS=()
declare -A PROPOSALS_FOR=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --backbone) BACKBONE=${2:?}; shift 2 ;;
    --scales) N_SCALES=${2:?}; shift 2 ;;
    --device) DEVICE=${2:?}; shift 2 ;;
    --train) TRAIN=${2:?}; shift 2 ;;
    --test) TEST=${2:?}; shift 2 ;;
    --run) RUN=${2:?}; shift 2 ;;
    --runs-root) RUNS_ROOT=$(abspath "${2:?}"); shift 2 ;;
    --weights) WEIGHTS=$(abspath "${2:?}"); shift 2 ;;
    --crops) CROPS=$(abspath "${2:?}"); shift 2 ;;
    --dataset) DATASET=${2:?}; shift 2 ;;
    --proposals-from)
      arg=${2:?}
      if [[ "$arg" == *=* && ! -e "$arg" ]]; then PROPOSALS_FOR[${arg%%=*}]=$(abspath "${arg#*=}")
      else PROPOSALS_ALL=$(abspath "$arg"); fi
      shift 2 ;;
    --set) USER_SETS+=("${2:?}"); shift 2 ;;
    --set=*) USER_SETS+=("${1#--set=}"); shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$VOC" ]] || die "one VOCDEVKIT only (got $VOC and $1)"; VOC=$(abspath "$1"); shift ;;
  esac
done
[[ -n "$VOC" ]] || { usage >&2; exit 2; }
[[ -d "$VOC/VOC2007" ]] || die "$VOC: no VOC2007/ folder here (expected the VOCdevkit folder that holds it)"
case "$BACKBONE" in
  mobilenet_v2) PRESET=voc2007-mobilenet
                default_weights=$(cd "$REPO/.." && pwd)/shared/weights/mobilenet_v2_imagenet_features.pt
                WEIGHTS=${WEIGHTS:-${SPP_MOBILENET_WEIGHTS:-$default_weights}}
                [[ -f "$WEIGHTS" ]] || die "$WEIGHTS: no such weights file (pass --weights FILE)" ;;
  zf5) PRESET=voc2007-zf5 ;;
  *) die "--backbone must be mobilenet_v2 or zf5, got $BACKBONE" ;;
esac
case "$DEVICE" in auto|cpu|cuda) ;; *) die "--device must be auto, cpu or cuda, got $DEVICE" ;; esac
for f in "$PROPOSALS_ALL" "${PROPOSALS_FOR[@]}"; do [[ -z "$f" || -f "$f" ]] || die "$f: no such proposals file"; done
RUN=${RUN:-voc07-$BACKBONE-s$N_SCALES}
RUNS_ROOT=${RUNS_ROOT:-$REPO/data/runs}
CROPS=${CROPS:-$RUNS_ROOT/$RUN/crops}
cd "$REPO"
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1  # stage output appears as it comes, through the tee

# The scales: 1 -> [features.one_scale]; N -> the preset's scales, which must number N (after --set overrides).
SETS=("data.train_split=$TRAIN" "data.test_split=$TEST")
[[ -n "$WEIGHTS" ]] && SETS+=("model.weights=$WEIGHTS")
# In every stage's config (so the run's config.json stays one config): zf5 pretrains on the crops, mobilenet_v2
# only wraps its ImageNet trunk (0 epochs). A user --set comes later and wins.
if [[ "$BACKBONE" == zf5 ]]; then SETS+=("pretrain.data=$CROPS"); else SETS+=("pretrain.epochs=0"); fi
scales=$("$PY" - "$PRESET" "$N_SCALES" "${SETS[@]}" "${USER_SETS[@]}" <<'EOF'
import sys
from stages.core.config import build_config
from stages.core.errors import SppError
from stages.core.runconfig import parse_sets
try:
    cfg = build_config(sys.argv[1], parse_sets(sys.argv[3:]))
except SppError as err:
    sys.exit(f"bench/voc2007.sh: {err}")
n = sys.argv[2]
if n == "1":
    print(f"[{cfg.features.one_scale}]")
elif n.isdigit() and int(n) == len(cfg.features.scales):
    print("[" + ", ".join(str(s) for s in cfg.features.scales) + "]")
else:
    sys.exit(f"bench/voc2007.sh: --scales {n}: the preset has {len(cfg.features.scales)} scales "
             f"{list(cfg.features.scales)} and 1-scale {cfg.features.one_scale}; use 1, "
             f"{len(cfg.features.scales)} or --set features.scales=[...]")
EOF
)
SETS+=("features.scales=$scales" "${USER_SETS[@]}")
COMMON=(--run "$RUN" --runs-root "$RUNS_ROOT" --dataset "$DATASET" --voc-root "$VOC" --config "$PRESET"
        --device "$DEVICE")
for s in "${SETS[@]}"; do COMMON+=(--set "$s"); done
RUN_DIR=$RUNS_ROOT/$RUN
mkdir -p "$RUN_DIR"
TIMES=$RUN_DIR/.bench_voc2007.times.tsv
: > "$TIMES"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "== bench/voc2007.sh: $BACKBONE, scales $scales, train $TRAIN, test $TEST, device $DEVICE, run $RUN_DIR"
echo "   machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

summary() {  # status: writes bench_voc2007.json and prints AP + stage times
  "$PY" - "$RUN_DIR" "$TIMES" "$1" "$TEST-ftfc7-s$(tr -cd , <<<"$scales" | wc -c | awk '{print $1 + 1}')-bb" \
      "$STARTED" "$BACKBONE" "$PRESET" "$scales" "$TRAIN" "$TEST" "$DEVICE" "$VOC" "$DATASET" \
      "${SETS[@]}" <<'EOF'
import json, os, platform, sys, time
from pathlib import Path
from stages.core.artifacts import atomic_write_json
run_dir, times_file, status, tag, started, backbone, preset, scales, train, test, device, voc, dataset = sys.argv[1:14]
sets = sys.argv[14:]
stages = []
for line in Path(times_file).read_text().splitlines():
    name, seconds, state, command = line.split("\t", 3)
    stages.append({"stage": name, "seconds": round(float(seconds), 2), "status": state, "command": command})
summary = {"script": "bench/voc2007.sh", "status": status, "started": started,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backbone": backbone, "preset": preset,
           "scales": json.loads(scales), "train_split": train, "test_split": test, "device": device,
           "voc_root": voc, "dataset": dataset, "sets": sets, "run_dir": run_dir,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
           "stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages), 2)}
try:
    import torch
    if torch.cuda.is_available():
        summary["machine"]["gpu"] = torch.cuda.get_device_name(0)
except Exception:  # noqa: BLE001 - the summary must be written whatever torch says
    pass
metrics_path = Path(run_dir) / "07_eval" / tag / "metrics.json"
if status == "ok" and metrics_path.exists():
    metrics = json.loads(metrics_path.read_text())
    summary.update({"eval_tag": tag, "metrics_file": str(metrics_path), "mAP": metrics["mAP"], "ap": metrics["ap"],
                    "npos": metrics.get("npos"), "num_images": metrics.get("num_images")})
    width = max(len(c) for c in metrics["ap"])
    print(f"\nAP on {test} ({tag}, VOC07 11-point):")
    for name, ap in metrics["ap"].items():
        print(f"  {name:<{width}}  {100 * ap:6.2f}")
    print(f"  {'mAP':<{width}}  {100 * metrics['mAP']:6.2f}")
print(f"\nstage times (wall s){'' if status == 'ok' else ' -- ' + status}:")
for s in stages:
    print(f"  {s['stage']:<18} {s['seconds']:>10.1f}  {s['status']}")
print(f"  {'total':<18} {summary['total_seconds']:>10.1f}")
out = Path(run_dir) / "bench_voc2007.json"
atomic_write_json(out, summary)
print(f"written: {out}")
EOF
}

stage() {  # name, spp arguments...: runs one stage, records its wall time and whether it ran or was up to date
  local name=$1 out rc start end state
  shift
  echo
  echo "== $name: spp $*"
  out=$(mktemp)
  start=$(date +%s.%N)
  set +e
  "$PY" -m sppcli "$@" | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s.%N)
  if ((rc != 0)); then state="failed (exit $rc)"
  elif grep -q '^up to date' "$out"; then state="up to date"
  else state=ran; fi
  rm -f "$out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')" "$state" \
    "spp $*" >> "$TIMES"
  echo "-- $name: $state, $(tail -n1 "$TIMES" | cut -f2) s"
  if ((rc != 0)); then summary "failed at $name"; exit "$rc"; fi
}

proposals_file() { echo "${PROPOSALS_FOR[$1]:-$PROPOSALS_ALL}"; }
for split in "$TRAIN" "$TEST"; do
  file=$(proposals_file "$split")
  stage "proposals $split" proposals "${COMMON[@]}" --split "$split" ${file:+--boxes-file "$file"}
done
if [[ "$BACKBONE" == zf5 ]]; then
  stage "crops" data crops --dataset "$DATASET" --voc-root "$VOC" --split "$TRAIN" --out "$CROPS"
fi
stage "pretrain" pretrain "${COMMON[@]}"
for split in "$TRAIN" "$TEST"; do
  stage "features $split" extract-features "${COMMON[@]}" --split "$split"
done
stage "finetune" finetune "${COMMON[@]}"
stage "train-svm ftfc7" train-svm "${COMMON[@]}" --feature ftfc7
stage "train-bbox" train-bbox "${COMMON[@]}"
stage "detect $TEST" detect "${COMMON[@]}" --split "$TEST" --feature ftfc7 --bbox
stage "eval $TEST" eval "${COMMON[@]}" --split "$TEST" --feature ftfc7 --bbox
summary ok
rm -f "$TIMES"
