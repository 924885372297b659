#!/usr/bin/env bash
# The whole SPP-net pipeline on a VOCdevkit folder, one stage after another, with the wall time of every stage,
# and every row of the paper's Table 9 it can make: proposals (train + test split), pretrain, extract-features
# (train + test); SVMs on pool5; SVMs on fc7 (only for a trunk with pretrained fc layers: zf5); finetune, SVMs
# on ftfc7, train-bbox, ftfc7 with and without box regression; beyond the paper, the fine-tuned fc8 softmax as
# the scorer (no SVMs), with and without box regression. Each row is detected and evaluated on the test split.
# Prints per-class AP, mAP, Table 9 and a stage-time table, and writes them to <runs-root>/<run>/bench_voc2007.json
# (with <run>/table9.json and <run>/table9.png, per-class AP of every row). Stages that are already up to date
# skip themselves, so a rerun (or a rerun after an interruption) only does what is missing.
#
#   bench/voc2007.sh VOCDEVKIT [options]
#
#   VOCDEVKIT             the folder that holds VOC2007/ (e.g. /work/shared/voc2007/VOCdevkit)
#   --budget B            gpu (default: the preset's full schedule, the paper's) | cpu (preset voc2007-cpu: the
#                         recipe for a 2-core CPU, 1 scale; every setting in it was chosen on held-out training
#                         images, see the preset's comments)
#   --rows R              Table 9 rows to make, comma-separated (default all: pool5,fc7,ftfc7,ftfc7-bb,softmax,
#                         softmax-bb); fc7 is left out for an ImageNet trunk without pretrained fc layers
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
#                         (finetune.conv=true: fine-tuning also trains the conv layers through the SPP layer;
#                         its rows are then scored on maps of its own conv layers, extracted after it)
#
# On a CPU budget (docs/voc2007.md, "Measured earlier on /work/shared/voc2007"): --set model.fc_dim=1024, a few thousand
# finetune.iters, and for weak features (ZF-5 from scratch) --set svm.tol=0.1, liblinear's own default: with
# the preset's 1e-4 its SVMs ran over 41 minutes on the 500 train images, with 0.1 in 12.
#
# Env: PY (default .venv/bin/python of the repository).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench/voc2007.sh: $*" >&2; exit 2; }
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
VOC="" BACKBONE=mobilenet_v2 N_SCALES=1 DEVICE=auto TRAIN=train TEST=val RUN="" RUNS_ROOT="" WEIGHTS="" BUDGET=gpu
ROWS=pool5,fc7,ftfc7,ftfc7-bb,softmax,softmax-bb
CROPS="" DATASET=voc2007
PROPOSALS_ALL="" USER_SETS=()
declare -A PROPOSALS_FOR=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --backbone) BACKBONE=${2:?}; shift 2 ;;
    --budget) BUDGET=${2:?}; shift 2 ;;
    --rows) ROWS=${2:?}; shift 2 ;;
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
case "$BUDGET" in cpu|gpu) ;; *) die "--budget must be cpu or gpu, got $BUDGET" ;; esac
case "$BACKBONE" in
  mobilenet_v2) PRESET=$([[ $BUDGET == cpu ]] && echo voc2007-cpu || echo voc2007-mobilenet)
                default_weights=$(cd "$REPO/.." && pwd)/shared/weights/mobilenet_v2_imagenet_features.pt
                WEIGHTS=${WEIGHTS:-${SPP_MOBILENET_WEIGHTS:-$default_weights}}
                [[ -f "$WEIGHTS" ]] || die "$WEIGHTS: no such weights file (pass --weights FILE)" ;;
  zf5) [[ $BUDGET == gpu ]] || die "--budget cpu is the MobileNetV2 recipe (use --backbone mobilenet_v2)"
       PRESET=voc2007-zf5 ;;
  *) die "--backbone must be mobilenet_v2 or zf5, got $BACKBONE" ;;
esac
case "$DEVICE" in auto|cpu|cuda) ;; *) die "--device must be auto, cpu or cuda, got $DEVICE" ;; esac
for f in "$PROPOSALS_ALL" "${PROPOSALS_FOR[@]}"; do [[ -z "$f" || -f "$f" ]] || die "$f: no such proposals file"; done
RUN=${RUN:-voc07-$BACKBONE-s$N_SCALES$([[ $BUDGET == cpu ]] && echo -cpu)}
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
print("conv" if cfg.finetune.conv else "fc")  # whether fine-tuning also trains the conv layers (its own maps)
EOF
)
FINETUNE_KIND=${scales##*$'\n'}
scales=${scales%%$'\n'*}
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

summary() {  # status: writes bench_voc2007.json and prints AP (of the best row evaluated) + stage times
  "$PY" - "$RUN_DIR" "$TIMES" "$1" "$(tr -cd , <<<"$scales" | wc -c | awk '{print $1 + 1}')" \
      "$STARTED" "$BACKBONE" "$PRESET" "$scales" "$TRAIN" "$TEST" "$DEVICE" "$VOC" "$DATASET" \
      "${SETS[@]}" <<'EOF'
import json, os, platform, sys, time
from pathlib import Path
from stages.core.artifacts import atomic_write_json
run_dir, times_file, status, n_scales, started, backbone, preset, scales, train, test, device, voc, dataset = sys.argv[1:14]
sets = sys.argv[14:]
stages = []
for line in Path(times_file).read_text().splitlines():
    name, seconds, state, peak, command = line.split("\t", 4)
    stages.append({"stage": name, "seconds": round(float(seconds), 2), "status": state,
                   "peak_rss_mb": int(peak) if peak.isdigit() else None, "command": command})
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
# Every row this invocation evaluated (ran or up to date), by its eval tag; the best one is printed in full.
rows = {}
for s in stages:
    words = s["command"].split()
    if s["stage"].startswith("eval ") and s["status"] in ("ran", "up to date") and "--feature" in words:
        tag = (f"{test}-{words[words.index('--feature') + 1]}-s{1 if '--one-scale' in words else n_scales}"
               f"{'-bb' if '--bbox' in words else ''}")
        path = Path(run_dir) / "07_eval" / tag / "metrics.json"
        if path.exists():
            rows[tag] = json.loads(path.read_text())
summary["rows"] = {tag: m["mAP"] for tag, m in rows.items()}
if status == "ok" and rows:
    tag = max(rows, key=lambda t: rows[t]["mAP"])
    metrics = rows[tag]
    summary.update({"eval_tag": tag, "metrics_file": str(Path(run_dir) / "07_eval" / tag / "metrics.json"),
                    "mAP": metrics["mAP"], "ap": metrics["ap"],
                    "npos": metrics.get("npos"), "num_images": metrics.get("num_images")})
    width = max(len(c) for c in metrics["ap"])
    print(f"\nAP on {test} ({tag}, the best row evaluated, VOC07 11-point):")
    for name, ap in metrics["ap"].items():
        print(f"  {name:<{width}}  {100 * ap:6.2f}")
    print(f"  {'mAP':<{width}}  {100 * metrics['mAP']:6.2f}")
print(f"\nstage times (wall s) and peak resident memory{'' if status == 'ok' else ' -- ' + status}:")
for s in stages:
    peak = "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:,} MB"
    print(f"  {s['stage']:<18} {s['seconds']:>10.1f}  {peak:>9}  {s['status']}")
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
  rss=$(mktemp)
  start=$(date +%s.%N)
  set +e
  # GNU time gives the stage's peak resident memory (its largest process, workers included); without it: "-".
  if [[ -x /usr/bin/time ]]; then /usr/bin/time -q -f %M -o "$rss" "$PY" -m sppcli "$@" | tee "$out"
  else "$PY" -m sppcli "$@" | tee "$out"; fi
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s.%N)
  if ((rc != 0)); then state="failed (exit $rc)"
  elif grep -q '^up to date' "$out"; then state="up to date"
  else state=ran; fi
  peak=$(awk 'NF && $1 ~ /^[0-9]+$/ {printf "%.0f", $1 / 1024; found = 1} END {if (!found) print "-"}' "$rss")
  rm -f "$out" "$rss"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')" \
    "$state" "$peak" "spp $*" >> "$TIMES"
  echo "-- $name: $state, $(tail -n1 "$TIMES" | cut -f2) s, peak RSS $peak MB"
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
# The Table 9 rows: (train-svm feature or "softmax", box regression) -> detect + eval on the test split.
ONE=$([[ $N_SCALES == 1 ]] && echo --one-scale || true)
want() { [[ ",$ROWS," == *",$1,"* ]]; }
# The pretrained trunk's maps: every row's, except that a model fine-tuned with --conv (finetune.conv) trains on
# the images and is scored on maps of its own conv layers, so its rows need them only for pool5 / fc7.
if [[ $FINETUNE_KIND == fc ]] || want pool5 || want fc7; then
  for split in "$TRAIN" "$TEST"; do
    stage "features $split" extract-features "${COMMON[@]}" --split "$split"
  done
fi
row() {  # label, scorer, bbox flag
  stage "detect $1" detect "${COMMON[@]}" --split "$TEST" --feature "$2" $ONE "$3"
  stage "eval $1" eval "${COMMON[@]}" --split "$TEST" --feature "$2" $ONE "$3"
}
if want pool5; then stage "train-svm pool5" train-svm "${COMMON[@]}" --feature pool5 $ONE; row pool5 pool5 --no-bbox; fi
if want fc7; then
  if [[ "$BACKBONE" == zf5 ]]; then stage "train-svm fc7" train-svm "${COMMON[@]}" --feature fc7 $ONE; row fc7 fc7 --no-bbox
  else echo "== fc7 row left out: the $BACKBONE ImageNet trunk has no pretrained fc layers (fc6/fc7 start random" \
            "and are trained only by fine-tuning, so 'fc7 without fine-tuning' would be random features)"; fi
fi
if want ftfc7 || want ftfc7-bb || want softmax || want softmax-bb; then stage "finetune" finetune "${COMMON[@]}"; fi
CONV_FROM=()
if [[ $FINETUNE_KIND == conv ]] && { want ftfc7 || want ftfc7-bb || want softmax || want softmax-bb; }; then
  CONV_FROM=(--conv-from finetune)
  if want ftfc7 || want ftfc7-bb || want softmax-bb; then  # SVMs and box regressors learn on the train split
    stage "features $TRAIN+ftconv" extract-features "${COMMON[@]}" --split "$TRAIN" "${CONV_FROM[@]}"
  fi
  stage "features $TEST+ftconv" extract-features "${COMMON[@]}" --split "$TEST" "${CONV_FROM[@]}"
fi
if want ftfc7 || want ftfc7-bb; then stage "train-svm ftfc7" train-svm "${COMMON[@]}" --feature ftfc7 $ONE; fi
if want ftfc7-bb || want softmax-bb; then stage "train-bbox" train-bbox "${COMMON[@]}" $ONE "${CONV_FROM[@]}"; fi
if want ftfc7; then row ftfc7 ftfc7 --no-bbox; fi
if want ftfc7-bb; then row ftfc7-bb ftfc7 --bbox; fi
if want softmax; then row softmax softmax --no-bbox; fi
if want softmax-bb; then row softmax-bb softmax --bbox; fi
"$PY" -m sppcli table9 "${COMMON[@]}" --json "$RUN_DIR/table9.json"
"$PY" - "$RUN_DIR/table9.json" "$RUN_DIR/table9.png" <<'EOF'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
table = json.load(open(sys.argv[1]))
cells = [(label, column, cell) for label, row in table["rows"].items() for column, cell in row.items() if cell]
classes = list(cells[0][2]["ap"]) if cells else []
fig, ax = plt.subplots(figsize=(max(8, len(classes) * 0.7), 4.5), dpi=150)
width = 0.8 / max(1, len(cells))
for i, (label, column, cell) in enumerate(cells):
    ax.bar(np.arange(len(classes)) + i * width, [100 * cell["ap"][c] for c in classes], width,
           label=f"{label} ({column}): mAP {100 * cell['mAP']:.1f}")
ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
ax.set_ylabel("AP (%)")
ax.set_title(f"Table 9 rows on {table['split']}: run {table['run']} ({table['backbone']})")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(sys.argv[2])
print(f"written: {sys.argv[2]}")
EOF
summary ok
rm -f "$TIMES"
