#!/usr/bin/env bash
# Selective-search proposals on VOC2007 val (500 images): recall@0.5/0.7, boxes/image and images/s with 1 and
# with 2 worker processes. Each run starts cold (its run folder is removed first) and records the machine load.
#
#   bench/proposals_recall.sh                                   # the default: SPEC §3, no cap
#   bench/proposals_recall.sh --set proposals.max_image_side=300  # extra options go to both `spp proposals` runs
#
# Env: VOC_ROOT (folder holding VOC2007/), RUNS_ROOT (/tmp/props), SPLIT (val), WORKERS ("1 2"), TAG (run suffix).
set -euo pipefail
cd "$(dirname "$0")/.."
VOC_ROOT=${VOC_ROOT:-/work/shared/voc2007/VOCdevkit}
RUNS_ROOT=${RUNS_ROOT:-/tmp/props}
SPLIT=${SPLIT:-val}
WORKERS=${WORKERS:-"1 2"}
TAG=${TAG:-}
PY=${PY:-.venv/bin/python}

runs=()
for workers in $WORKERS; do
  run="${SPLIT}-w${workers}${TAG}"
  runs+=("$run")
  rm -rf "${RUNS_ROOT:?}/$run"
  echo "== spp proposals --split $SPLIT --workers $workers $* (run $RUNS_ROOT/$run)"
  echo "   load average before: $(cut -d' ' -f1-3 /proc/loadavg); busiest other processes:"
  ps -eo pcpu=,etime=,args= --sort=-pcpu | head -6 | cut -c1-150 | sed 's/^/     /'
  "$PY" -m sppcli proposals --runs-root "$RUNS_ROOT" --run "$run" --dataset voc2007 --voc-root "$VOC_ROOT" \
    --split "$SPLIT" --workers "$workers" "$@"
  echo "   load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
done

"$PY" - "$RUNS_ROOT" "$SPLIT" "${runs[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
root, split, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print(f"\n{'run':<14} {'workers':>7} {'images':>6} {'R@0.5':>7} {'R@0.7':>7} {'R@0.5all':>8} {'R@0.7all':>8} "
      f"{'MABO':>6} {'box/img':>8} {'median':>7} {'img/s':>7} {'CPUs/img':>8}")
for run in runs:
    m = json.loads((root / run / "01_proposals" / split / "MANIFEST.json").read_text())["metrics"]
    print(f"{run:<14} {m['workers']:>7} {m['images']:>6} {m['recall@0.5']:>7.4f} {m['recall@0.7']:>7.4f} "
          f"{m['recall@0.5_all']:>8.4f} {m['recall@0.7_all']:>8.4f} {m['mabo']:>6.3f} "
          f"{m['boxes_per_image_mean']:>8.1f} {m['boxes_per_image_median']:>7.0f} {m['images_per_s'] or 0:>7.3f} "
          f"{m['cpu_s_per_image'] or 0:>8.3f}")
PYEOF
