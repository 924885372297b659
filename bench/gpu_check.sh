#!/usr/bin/env bash
# One GPU check, prepared: on a lent CUDA machine, in at most 8 minutes, the GPU-marked tests, `spp bench --device
# cuda` (the paper's Table 10 on the voc2007-zf5 preset: R-CNN mode on every window, no subsampling, against SPP
# 1-scale and 5-scale) and the embedded pipeline (the stages `make all` runs, in `make`'s order, with --device cuda
# and the wall time of each), every part under `timeout` within one overall budget; a failed part is recorded and
# the next one runs. Then ONE summary block: GPU name, tests passed/failed, SPP 1-scale images/s and the SPP/R-CNN
# speed ratio (from bench's JSON), each stage's wall time and status, Table 9 if the pipeline got there, and the last
# lines of every failure. The summary is also written as JSON: --out FILE, else $OUT/gpu_check.json when OUT is set
# (then gpu_check_bench.json, gpu_check_table9.json and gpu_check.log, every part's output, go beside it), else
# <work>/gpu_check.json. Without a CUDA GPU it prints one line ("no CUDA GPU here: nothing to check") and exits 0.
#
#   bench/gpu_check.sh --prepare     HERE, once (no GPU; a few CPU minutes, `nice -n 19` on a busy machine): fetches
#                                    the wheels the device image lacks into .whl/, generates the embedded dataset
#                                    (`spp data synth`, as `make all` does) into data/gpu_check/synth, computes its
#                                    selective-search proposals here (the image's OpenCV has no cv2.ximgproc) into
#                                    data/gpu_check/proposals/<split>.h5, writes the stage plan (`make -n`) to
#                                    data/gpu_check/plan.tsv, and prints the sizes. Both folders are git-ignored
#                                    (.gitignore: .whl/ and /data/*), so they travel only when carried.
#   bench/gpu_check.sh [options]     THERE: the check.
#
# The device run (tool `run`), after --prepare here:
#     command  bench/gpu_check.sh        carry  [".whl", "data/gpu_check"]        timeout_s  560
# (8 minutes of parts, plus install and summary; a machine's start is extra.) That carries about 46 MiB (the
# dataset 44, its proposals 2.4, the wheel 0.03; the tree travels too, about 1 MiB; --prepare prints the sizes),
# under the 64 MiB a call may take. Lean, about 2.5 MiB: carry [".whl", "data/gpu_check/proposals",
# "data/gpu_check/plan.tsv", "data/gpu_check/synth.sha256"]; the check then generates the dataset there (`spp data
# synth`, a timed stage) and says whether its VOC2007/ is byte-identical to the one the proposals were computed on.
#
# The device image runs its own python3 (torch, torchvision, h5py, scikit-learn, scipy, click, tqdm, matplotlib,
# filelock, pillow, pytest, opencv-python-headless WITHOUT contrib) and reaches no package registry: the carried
# wheels (.whl/*.whl: defusedxml, pinned as in requirements.lock) are installed with
# `pip install --no-index --no-deps --target <work>/site`, and the project itself runs from the repository
# (PYTHONPATH=<work>/site:<repo>, `python3 -m sppcli`): nothing is built there. The proposal stages import the
# carried boxes (`spp proposals --boxes-file`), so no selective search runs there.
#
# Parts, in order, each under `timeout` (its own limit, or what is left of the budget if less): install (60 s),
# imports (every runtime import of stages/ and sppcli/, 60 s), tests (`pytest -m gpu` on the files that hold
# GPU-marked tests, 120 s), bench (180 s), then every pipeline stage (what is left). Parts the budget no longer
# covers are "skipped (budget spent)".
#
# Options:
#   --prepare             run the preparation described above instead of the check
#   --budget S            overall budget in seconds (default 480; 150 on the forced CPU run)
#   --bench-images N      images for spp bench (default 20 on cuda: 500x375 random textures, 2,000 random windows
#                         each, 3 repeats; 1 image, 300 windows, 1 repeat on the forced CPU run)
#   --set KEY=VALUE       a config key for every pipeline stage (repeatable; e.g. --set finetune.iters=500)
#   --only PARTS          run only these of tests,bench,pipeline (comma-separated; install always runs), e.g. to
#                         rerun the part that failed
#   --work DIR            where the site, the runs and the logs go (default a new /tmp/gpu_check.XXXXXX)
#   --out FILE            the summary JSON (default $OUT/gpu_check.json when OUT is set, else <work>/gpu_check.json)
#
# Exit status: 0 every part ran and passed (or no GPU: nothing to check); 1 a part failed or hit its own time
# limit; 3 nothing failed but the budget stopped or skipped parts; 2 a bad option.
#
# Env: PY (default .venv/bin/python of the repository if there, else python3: on the device, the image's own).
# SPP_GPU_CHECK_DEVICE=cpu runs the same sequence on the CPU with small bench settings and a 150 s budget (to try
# the script's logic without a GPU; the budget stops the pipeline early, by design).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench/gpu_check.sh: $*" >&2; exit 2; }
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
PRE=$REPO/data/gpu_check         # the prepared payload: synth/, proposals/<split>.h5, plan.tsv
WHL=$REPO/.whl                   # the carried wheels
WHEELS=(defusedxml)              # runtime imports the device image lacks (versions from requirements.lock); numba
                                 # is not carried: only svm.solver=dense imports it, and the embedded preset does not set it
RUN_NAME=synth                   # the pipeline's run (as `make all`)

MODE=check BUDGET="" BENCH_IMAGES="" WORK="" OUT_JSON="" USER_SETS=() PART_LABEL="" ONLY=tests,bench,pipeline
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --prepare) MODE=prepare; shift ;;
    --budget) BUDGET=${2:-}; [[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget needs whole seconds, got '${2:-}'"; shift 2 ;;
    --bench-images) BENCH_IMAGES=${2:-}
                    [[ "$BENCH_IMAGES" =~ ^[1-9][0-9]*$ ]] || die "--bench-images needs a positive count, got '${2:-}'"
                    shift 2 ;;
    --set) [[ -n "${2:-}" && "$2" == *=* ]] || die "--set needs KEY=VALUE, got '${2:-}'"; USER_SETS+=("$2"); shift 2 ;;
    --set=*) USER_SETS+=("${1#--set=}"); shift ;;
    --only) ONLY=${2:-}
            [[ "$ONLY" =~ ^(tests|bench|pipeline)(,(tests|bench|pipeline))*$ ]] \
              || die "--only takes tests, bench and/or pipeline, comma-separated, got '${2:-}'"
            shift 2 ;;
    --work) [[ -n "${2:-}" ]] || die "--work needs a folder"; WORK=$(abspath "$2"); shift 2 ;;
    --out) [[ -n "${2:-}" ]] || die "--out needs a file"; OUT_JSON=$(abspath "$2"); shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
FORCE=${SPP_GPU_CHECK_DEVICE:-}
case "$FORCE" in ""|cpu) ;; *) die "SPP_GPU_CHECK_DEVICE must be cpu (or unset), got $FORCE" ;; esac
cd "$REPO"
if [[ -z "${PY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1

# The stage plan: `make -n` of the pipeline with placeholders, one "name<TAB>command" line per stage, in make's
# order. `data synth` is left out (the dataset is prepared); the proposals stages get --boxes-file at check time.
make_plan() {  # out file
  local out=$1 n_scales raw line words name cmd split feature scale bb
  n_scales=$(make -s --no-print-directory PYTHON="$PY" --eval 'gpu-check-n-scales: ; @echo $(N_SCALES)' \
             gpu-check-n-scales)
  [[ "$n_scales" =~ ^[0-9]+$ ]] || { echo "make_plan: could not read the preset's number of scales" >&2; return 1; }
  raw=$(make -n --no-print-directory -o install -o .venv/.installed pipeline PYTHON="$PY" SPP=__SPP__ \
        SYNTH_ROOT=__VOC__ RUN=__RUN__ R=__R__ SPP_FLAGS=__FLAGS__)
  : > "$out.tmp"
  while IFS= read -r line; do
    read -ra words <<<"$line"
    while ((${#words[@]})) && [[ "${words[0]}" == *=* ]]; do words=("${words[@]:1}"); done  # OMP_NUM_THREADS=..
    ((${#words[@]} >= 2)) && [[ "${words[0]}" == __SPP__ ]] || continue
    [[ "${words[1]}" == data ]] && continue  # `spp data synth`: prepared
    cmd=${words[1]} split="" feature="" scale=s$n_scales bb=""
    set -- "${words[@]:2}"
    while (($#)); do
      case "$1" in --split) split=$2; shift ;; --feature) feature=$2; shift ;; --one-scale) scale=s1 ;; --bbox) bb=-bb ;; esac
      shift
    done
    case "$cmd" in
      proposals|extract-features) name="$cmd $split" ;;
      train-svm) name="$cmd $feature-$scale" ;;
      train-bbox) name="$cmd $scale" ;;
      detect|eval) name="$cmd $split-$feature-$scale$bb" ;;
      *) name=$cmd ;;
    esac
    printf '%s\t%s\n' "$name" "${words[*]}" >> "$out.tmp"
  done <<<"$raw"
  [[ -s "$out.tmp" ]] || { echo "make_plan: make -n printed no stage" >&2; rm -f "$out.tmp"; return 1; }
  mv "$out.tmp" "$out"
}

human() { du -sh --apparent-size "$@" 2>/dev/null | awk '{print $1}'; }
# One digest of a synth devkit's VOC2007/ (the images and annotations the proposals belong to).
synth_digest() { (cd "$1" && find VOC2007 -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64; }
note() { echo "note: $*"; echo "$*" >> "$WORK/notes.txt"; }

# ------------------------------------------------------------------------------------------------ --prepare (here)
prepare() {
  local path name version split tmp found tree
  echo "== bench/gpu_check.sh --prepare: wheels into .whl/, dataset + proposals + plan into data/gpu_check/"
  for path in .whl/x.whl data/gpu_check/x; do
    git check-ignore -q "$path" 2>/dev/null \
      || echo "   warning: $path is not git-ignored: add it to .git/info/exclude, or it travels uncarried"
  done
  mkdir -p "$WHL" "$PRE/proposals"
  for name in "${WHEELS[@]}"; do
    version=$(grep -i "^$name==" requirements.lock | head -n1 | cut -d= -f3)
    [[ -n "$version" ]] || { echo "bench/gpu_check.sh: $name has no pin in requirements.lock" >&2; return 1; }
    found=$(compgen -G "$WHL/${name}-${version}-*.whl" || true)
    if [[ -n "$found" ]]; then echo "-- wheel $name==$version: already in .whl/"; continue; fi
    echo "-- wheel $name==$version"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "$name==$version"
  done
  echo "-- stage plan (make -n pipeline)"
  make_plan "$PRE/plan.tsv"
  echo "   $(wc -l <"$PRE/plan.tsv") stages: $(cut -f1 "$PRE/plan.tsv" | paste -sd, | sed 's/,/, /g')"
  if [[ -f "$PRE/synth/VOC2007/ImageSets/Main/test.txt" ]]; then
    echo "-- dataset: data/gpu_check/synth already there"
  else
    echo "-- dataset: spp data synth --out data/gpu_check/synth"
    "$PY" -m sppcli data synth --out "$PRE/synth"
  fi
  echo "VOC2007 $(synth_digest "$PRE/synth")" > "$PRE/synth.sha256"
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_prep.XXXXXX")
  for split in $(awk -F'\t' '$1 ~ /^proposals / {print substr($1, 11)}' "$PRE/plan.tsv"); do
    if [[ -f "$PRE/proposals/$split.h5" && "$PRE/proposals/$split.h5" -nt "$PRE/synth/VOC2007/ImageSets/Main/test.txt" ]]
    then echo "-- proposals $split: data/gpu_check/proposals/$split.h5 already there"; continue; fi
    echo "-- proposals $split: selective search here"
    "$PY" -m sppcli proposals --run prep --runs-root "$tmp" --dataset synth --voc-root "$PRE/synth" --config synth \
      --device cpu --split "$split"
    cp "$tmp/prep/01_proposals/$split/proposals.h5" "$PRE/proposals/$split.h5.tmp"
    mv "$PRE/proposals/$split.h5.tmp" "$PRE/proposals/$split.h5"
  done
  rm -rf "$tmp"
  tree=$(git ls-files -co --exclude-standard -z 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -n1 | cut -f1)
  echo
  echo "prepared (carried sizes):"
  echo "  .whl                     $(human "$WHL")  ($(cd "$WHL" && ls *.whl | paste -sd' '))"
  echo "  data/gpu_check/synth     $(human "$PRE/synth")"
  echo "  data/gpu_check/proposals $(human "$PRE/proposals")  ($(cd "$PRE/proposals" && ls | paste -sd' '))"
  echo "  data/gpu_check/plan.tsv  $(human "$PRE/plan.tsv")  (and synth.sha256)"
  echo "  carried in all           $(du -csh --apparent-size "$WHL" "$PRE" | tail -n1 | cut -f1); the tree that travels anyway:" \
       "$(awk -v b="${tree:-0}" 'BEGIN {printf "%.1fM", b / 1048576}')"
  echo "device run: command 'bench/gpu_check.sh', carry [\".whl\", \"data/gpu_check\"], timeout_s 560"
  echo "  (lean, $(du -csh --apparent-size "$WHL" "$PRE/proposals" "$PRE/plan.tsv" "$PRE/synth.sha256" | tail -n1 | cut -f1): carry [\".whl\"," \
       "\"data/gpu_check/proposals\", \"data/gpu_check/plan.tsv\", \"data/gpu_check/synth.sha256\"] and the" \
       "dataset is generated there, about 20-40 s of the budget)"
}

if [[ "$MODE" == prepare ]]; then prepare; exit 0; fi

# ------------------------------------------------------------------------------------------------ the check (there)
probe=$("$PY" - 2>/dev/null <<'EOF' || true
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.__version__, torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", sep="\t")
else:
    print("none", torch.__version__, sep="\t")
EOF
)
IFS=$'\t' read -r kind torch_version gpu_name gpu_memory <<<"${probe:-none}" || true
if [[ "$kind" != cuda && -z "$FORCE" ]]; then
  if [[ -n "$torch_version" ]]; then why="torch $torch_version sees no CUDA device"
  else why="$PY cannot import torch"; fi
  smi=$(nvidia-smi -L 2>/dev/null | head -n1 || true)
  [[ -z "$smi" ]] || why+="; nvidia-smi: $smi"
  cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
  [[ -z "$cpu" ]] || why+="; CPU: $cpu x $(nproc)"
  echo "no CUDA GPU here: nothing to check ($why)"
  exit 0
fi
if [[ -n "$FORCE" ]]; then
  DEVICE=cpu BUDGET=${BUDGET:-150} BENCH_IMAGES=${BENCH_IMAGES:-1} BENCH_CONFIG=synth BENCH_WINDOWS=300 BENCH_REPEATS=1
  gpu_name="none (forced CPU run: SPP_GPU_CHECK_DEVICE=cpu)" gpu_memory=""
else
  DEVICE=cuda BUDGET=${BUDGET:-480} BENCH_IMAGES=${BENCH_IMAGES:-20} BENCH_CONFIG=voc2007-zf5 BENCH_WINDOWS=2000
  BENCH_REPEATS=3
fi
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)
START=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
DEADLINE=$((START + BUDGET))
RESERVE=8      # seconds kept for the summary
MIN_PART=5     # a part with less than this left is skipped
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/no_voc"
if [[ -z "$OUT_JSON" ]]; then OUT_JSON=${OUT:+$OUT/gpu_check.json}; OUT_JSON=${OUT_JSON:-$WORK/gpu_check.json}; fi
PARTS=$WORK/parts.tsv
: > "$PARTS"
NPART=0
echo "== bench/gpu_check.sh: device $DEVICE${gpu_name:+ ($gpu_name${gpu_memory:+, $gpu_memory})}, torch $torch_version," \
     "budget ${BUDGET}s, work $WORK"
echo "   machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), python $PY"

run_part() {  # group, name, own limit in s (0: none), command...: runs under timeout, records time and status
  local group=$1 name=$2 cap=$3 left limit log rc start end status shown
  shift 3
  shown=${PART_LABEL:-$*}
  shown=${shown//[$'\t\n']/ }
  PART_LABEL=""
  NPART=$((NPART + 1))
  log=$WORK/logs/$(printf '%02d' "$NPART")-${name//[^A-Za-z0-9._-]/_}.log
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if ((left < MIN_PART)); then
    printf '%s\t%s\t0\tskipped (budget spent)\t\t0\t\t%s\n' "$group" "$name" "$shown" >> "$PARTS"
    echo "-- $name: skipped (budget spent)"
    return 0
  fi
  limit=$left
  if ((cap > 0 && cap < left)); then limit=$cap; fi
  echo
  echo "== $name (limit ${limit}s): $shown"
  start=$(date +%s.%N)
  set +e
  timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s.%N)
  if ((rc == 0)); then
    if grep -q '^up to date' "$log"; then status="up to date"; else status=ok; fi
  elif ((rc == 124 || rc == 137)); then
    if ((limit == left)); then status="stopped (budget spent after ${limit}s)"; else status="timeout (${limit}s)"; fi
  else status="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$group" "$name" "$(awk -v a="$start" -v b="$end" \
    'BEGIN {printf "%.2f", b - a}')" "$status" "$rc" "$limit" "$log" "$shown" >> "$PARTS"
  echo "-- $name: $status, $(tail -n1 "$PARTS" | cut -f3) s"
}

# 1. install: the carried wheels into <work>/site; the project runs from the repository.
SITE=$WORK/site
mapfile -t wheels < <(compgen -G "$WHL/*.whl" || true)
if ((${#wheels[@]})); then
  run_part install install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
else
  echo "-- install: no wheels in .whl/ (none carried; the imports part says whether any are missing)"
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
# Every top-level module stages/ and sppcli/ import at runtime (beside the standard library).
IMPORTS_PY=$(cat <<'EOF'
import importlib, warnings
missing, found = [], []
for name in ("click", "numpy", "torch", "torchvision", "h5py", "sklearn", "scipy", "tqdm", "matplotlib", "cv2",
             "PIL", "defusedxml", "filelock", "stages", "sppcli"):
    try:
        module = importlib.import_module(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # click deprecates __version__
            found.append(f"{name} {getattr(module, '__version__', '')}".strip())
    except Exception as exc:  # noqa: BLE001 - any import failure is a missing package here
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
print("found: " + ", ".join(found))
import cv2
print("cv2.ximgproc (selective search):", "yes" if hasattr(cv2, "ximgproc") else "no (proposals come from the carried files)")
if missing:
    raise SystemExit("missing: " + "; ".join(missing) + " -- carry them as wheels (bench/gpu_check.sh --prepare)")
EOF
)
PART_LABEL="$PY -c <import every runtime dependency>"
run_part install imports 60 "$PY" -c "$IMPORTS_PY"

want() { [[ ",$ONLY," == *",$1,"* ]]; }

# 2. the GPU-marked tests (only the files that hold them: collecting the rest would need dev-only packages).
mapfile -t gpu_tests < <(grep -l 'pytest.mark.gpu' tests/test_*.py || true)
if ! want tests; then :
elif ((${#gpu_tests[@]})); then
  run_part tests "pytest -m gpu" 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    "${gpu_tests[@]}"
else
  run_part tests "pytest -m gpu" 120 bash -c 'echo "no GPU-marked tests found under tests/"; exit 1'
fi

# 3. spp bench: random-texture images and random windows (an empty --voc-root: no dataset, so no selective search);
# on cuda R-CNN mode times every window (the CPU subsamples 128).
if want bench; then
  run_part bench "spp bench" 180 "$PY" -m sppcli bench --run bench --runs-root "$WORK/runs" --config "$BENCH_CONFIG" \
    --dataset voc2007 --voc-root "$WORK/no_voc" --device "$DEVICE" --num-images "$BENCH_IMAGES" \
    --windows "$BENCH_WINDOWS" --repeats "$BENCH_REPEATS" --json "$WORK/bench.json"
fi

# 4. the embedded pipeline: the stages `make all` runs, one after another.
PLAN=$PRE/plan.tsv
if ! want pipeline; then PLAN=/dev/null
elif [[ ! -s "$PLAN" ]] && command -v make >/dev/null; then
  PLAN=$WORK/plan.tsv
  make_plan "$PLAN" || true
fi
VOC=$PRE/synth
if [[ -s "$PLAN" && ! -f "$VOC/VOC2007/ImageSets/Main/test.txt" ]]; then
  # The lean carry (no data/gpu_check/synth): generate the dataset here, as `make all` does, and compare its
  # detection images with the prepared ones, which the carried proposals were computed on.
  VOC=$WORK/synth
  run_part pipeline "data synth" 0 "$PY" -m sppcli data synth --out "$VOC"
  if [[ -f "$PRE/synth.sha256" && -d "$VOC/VOC2007" ]]; then
    if [[ "$(synth_digest "$VOC")" == "$(cut -d' ' -f2 "$PRE/synth.sha256")" ]]; then
      note "dataset generated here (not carried): its VOC2007/ is identical to the prepared one"
    else
      note "dataset generated here (not carried): its VOC2007/ differs from the prepared one (other OpenCV/NumPy" \
           "builds), so the carried proposals were computed on slightly different images"
    fi
  fi
fi
if ! want pipeline; then :
elif [[ ! -s "$PLAN" || ! -f "$VOC/VOC2007/ImageSets/Main/test.txt" ]]; then
  run_part pipeline "pipeline" 0 bash -c 'echo "not prepared: no data/gpu_check/plan.tsv or no dataset;" \
    "run bench/gpu_check.sh --prepare here and carry data/gpu_check"; exit 1'
else
  FLAGS=(--runs-root "$WORK/runs" --device "$DEVICE")
  for s in "${USER_SETS[@]}"; do FLAGS+=(--set "$s"); done
  mapfile -t plan_lines < "$PLAN"
  for entry in "${plan_lines[@]}"; do
    name=${entry%%$'\t'*}
    read -ra words <<<"${entry#*$'\t'}"
    cmd=()
    for w in "${words[@]}"; do
      case "$w" in
        __SPP__) cmd+=("$PY" -m sppcli) ;;
        __FLAGS__) cmd+=("${FLAGS[@]}") ;;
        *) w=${w//__VOC__/$VOC}; w=${w//__RUN__/$RUN_NAME}; w=${w//__R__/$WORK/runs/$RUN_NAME}; cmd+=("$w") ;;
      esac
    done
    if [[ "$name" == "proposals "* && -f "$PRE/proposals/${name#proposals }.h5" ]]; then
      cmd+=(--boxes-file "$PRE/proposals/${name#proposals }.h5")
    fi
    run_part pipeline "$name" 0 "${cmd[@]}"
  done
fi

# 5. the summary: printed once, and written as JSON.
set +e
"$PY" - "$PARTS" "$WORK" "$OUT_JSON" "${OUT:-}" "$STARTED" "$START" "$BUDGET" "$DEVICE" "$gpu_name" "$gpu_memory" \
    "$torch_version" "$driver" "$WORK/runs/$RUN_NAME/table9.json" <<'EOF'
import json, os, platform, shutil, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

(parts_file, work, out_json, out_dir, started, start, budget, device, gpu, gpu_memory, torch_version, driver,
 table9_path) = sys.argv[1:14]
work = Path(work)
parts = []
for line in Path(parts_file).read_text().splitlines():
    group, name, seconds, status, rc, limit, log, command = line.split("\t", 7)
    parts.append({"group": group, "name": name, "seconds": float(seconds), "status": status,
                  "exit_code": int(rc) if rc else None, "limit_s": int(limit), "log": log or None, "command": command})


def tail(path, n):
    """The last n non-empty lines; of a progress bar's carriage-return updates only the last, cut to 240 chars."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    lines = [line.split("\r")[-1].rstrip() for line in text.split("\n")]
    return [line[:240] for line in lines if line.strip()][-n:]


def bad(p):
    return p["status"].startswith(("failed", "timeout"))


def group_status(name):
    ps = [p for p in parts if p["group"] == name]
    if not ps:
        return "not run"
    if any(bad(p) for p in ps):
        return "failed"
    if any(p["status"].startswith(("skipped", "stopped")) for p in ps):
        return "incomplete (budget)"
    return "ok"


summary = {"script": "bench/gpu_check.sh", "started": started,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device,
           "gpu": {"name": gpu, "memory": gpu_memory or None, "driver": driver or None}, "torch": torch_version,
           "budget_s": int(budget), "elapsed_s": round(time.time() - int(start), 1), "work": str(work),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
           "parts": parts}

# tests: from pytest's JUnit XML
tests = {"status": group_status("tests")}
try:
    root = ET.parse(work / "tests.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    tests.update(passed=count["tests"] - count["failures"] - count["errors"] - count["skipped"],
                 failed=count["failures"] + count["errors"], skipped=count["skipped"], total=count["tests"],
                 failing=[f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                          if c.find("failure") is not None or c.find("error") is not None])
except (OSError, ET.ParseError):
    pass
summary["tests"] = tests

# bench: from its JSON
bench = {"status": group_status("bench")}
try:
    b = json.loads((work / "bench.json").read_text())
    spp1 = b["spp_1scale_seconds_per_image"]
    bench.update(device=b.get("device"), images=len(b.get("image_ids", [])), windows=b["windows"],
                 rcnn_windows_timed=b["rcnn_windows_timed"], spp_1scale_seconds_per_image=spp1,
                 spp_1scale_images_per_s=1 / spp1 if spp1 > 0 else None,
                 spp_5scale_seconds_per_image=b["spp_5scale_seconds_per_image"],
                 rcnn_seconds_per_image=b["rcnn_seconds_per_image"],
                 speedup_total_1scale=b["speedup_total_1scale"], speedup_conv_1scale=b["speedup_conv_1scale"],
                 speedup_total_5scale=b["speedup_total_5scale"], matmul_gflops=b.get("matmul_gflops"),
                 conv_gflops_per_s={m: b["modes"][m]["gflops_per_s"]["conv"] for m in b["modes"]},
                 fc_dtype=b.get("fc_dtype"), cuda_tf32=b.get("cuda_tf32"), wall_seconds=b.get("wall_seconds"))
except (OSError, KeyError, ValueError, ZeroDivisionError):
    pass
summary["bench"] = bench

stages = [p for p in parts if p["group"] == "pipeline"]
summary["pipeline"] = {"status": group_status("pipeline"), "stages": len(stages),
                       "done": sum(p["status"] in ("ok", "up to date") for p in stages),
                       "seconds": round(sum(p["seconds"] for p in stages), 2)}
try:
    t9 = json.loads(Path(table9_path).read_text())
    summary["pipeline"]["table9"] = {label: {col: round(100 * cell["mAP"], 1) for col, cell in row.items() if cell}
                                     for label, row in t9["rows"].items()}
except (OSError, KeyError, ValueError, TypeError, AttributeError):
    pass
failures = [p for p in parts if bad(p)]
summary["failures"] = [{"part": p["name"], "status": p["status"], "last_lines": tail(p["log"], 15)} for p in failures]
statuses = [group_status(g) for g in ("install", "tests", "bench", "pipeline") if group_status(g) != "not run"]
try:
    summary["notes"] = (work / "notes.txt").read_text().splitlines()
except OSError:
    summary["notes"] = []
summary["status"] = ("failed" if "failed" in statuses or failures else
                     "incomplete (budget)" if any(s != "ok" for s in statuses) else "ok")

# -- the one summary block
f = lambda x, spec: format(x, spec) if isinstance(x, (int, float)) else "-"
lines = ["", "=" * 34 + " gpu_check summary " + "=" * 34,
         f"GPU       {gpu}{', ' + gpu_memory if gpu_memory else ''}{', driver ' + driver if driver else ''}"
         f"; torch {torch_version}, stages on {device}",
         f"status    {summary['status']}: {summary['elapsed_s']:.0f} s of a {budget} s budget"]
inst = [p for p in parts if p["group"] == "install"]
lines.append("install   " + ", ".join(f"{p['name']} {p['status']}" for p in inst))
if "total" in tests:
    lines.append(f"tests     {tests['status']}: {tests['passed']} passed, {tests['failed']} failed, "
                 f"{tests['skipped']} skipped (pytest -m gpu)" + (f"; failing: {', '.join(tests['failing'])}"
                                                                  if tests["failing"] else ""))
else:
    lines.append(f"tests     {tests['status']}" + ("" if tests["status"] == "not run" else ": no JUnit report"))
if "spp_1scale_seconds_per_image" in bench:
    every = "every window" if bench["rcnn_windows_timed"] >= bench["windows"] else \
        f"{bench['rcnn_windows_timed']} timed, scaled"
    lines += [f"bench     {bench['status']}: SPP 1-scale {f(bench['spp_1scale_images_per_s'], '.2f')} images/s "
              f"({f(bench['spp_1scale_seconds_per_image'], '.4f')} s/image), SPP 5-scale "
              f"{f(bench['spp_5scale_seconds_per_image'], '.4f')} s/image, R-CNN "
              f"{f(bench['rcnn_seconds_per_image'], '.4f')} s/image",
              f"          SPP/R-CNN speed ratio {f(bench['speedup_total_1scale'], '.1f')}x total, "
              f"{f(bench['speedup_conv_1scale'], '.1f')}x conv at 1 scale; "
              f"{f(bench['speedup_total_5scale'], '.1f')}x total at 5 scales "
              f"({bench['images']} images x {bench['windows']} windows, R-CNN: {every}; matmul "
              f"{f(bench['matmul_gflops'], '.0f')} GFLOP/s)"]
else:
    lines.append(f"bench     {bench['status']}" + ("" if bench["status"] == "not run" else ": no bench JSON"))
pl = summary["pipeline"]
lines.append(f"pipeline  {pl['status']}" + ("" if pl["status"] == "not run" else
                                            f": {pl['done']} of {pl['stages']} stages done, {pl['seconds']:.1f} s"))
if stages:
    width = max(len(p["name"]) for p in stages)
    shown = [p for p in stages if not p["status"].startswith("skipped")]
    lines += [f"  {p['name']:<{width}}  {p['seconds']:>8.1f} s  {p['status']}" for p in shown]
    skipped = [p["name"] for p in stages if p["status"].startswith("skipped")]
    if skipped:
        lines.append(f"  skipped (budget spent), {len(skipped)}: {', '.join(skipped)}")
for label, row in pl.get("table9", {}).items():
    lines.append(f"  table9 {label}: " + ", ".join(f"{col} {v:.1f}" for col, v in row.items()))
lines += [f"note      {n}" for n in summary["notes"]]
if failures:  # the first failure of each part group with its last lines; later ones (often its consequences) with one
    lines.append("failures:")
    seen = set()
    for part, item in zip(failures, summary["failures"]):
        lines.append(f"  {item['part']}: {item['status']}")
        lines += [f"    | {l}" for l in item["last_lines"][-1 if part["group"] in seen else -15:]]
        seen.add(part["group"])

# -- files: the summary JSON, and beside it in $OUT the bench JSON, Table 9 and the whole log
out = Path(out_json)
out.parent.mkdir(parents=True, exist_ok=True)
if out_dir:
    extras = {"gpu_check_bench.json": work / "bench.json", "gpu_check_table9.json": Path(table9_path)}
    for target, source in extras.items():
        if source.exists():
            shutil.copyfile(source, Path(out_dir) / target)
    with open(Path(out_dir) / "gpu_check.log", "w") as log:
        for p in parts:
            log.write(f"===== {p['name']}: {p['status']} ({p['seconds']:.1f} s)\n{p['command']}\n")
            if p["log"] and Path(p["log"]).exists():
                log.write(Path(p["log"]).read_text(errors="replace"))
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(summary, indent=2) + "\n")
tmp.replace(out)
lines += [f"written: {out}", "=" * 87]
print("\n".join(lines))
sys.exit({"ok": 0, "failed": 1}.get(summary["status"], 3))
EOF
rc=$?
set -e
if ((rc != 0 && rc != 1 && rc != 3)); then
  echo "bench/gpu_check.sh: the summary itself failed (exit $rc); the parts, raw:" >&2
  cut -f1-6 "$PARTS" >&2
fi
exit "$rc"
