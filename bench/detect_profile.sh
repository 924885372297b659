#!/usr/bin/env bash
# Where detection's time goes, against what the model itself costs (issue #14 item 3), for a finished run:
#
#   1. `spp detect --split SPLIT` (conv5 maps read from the run's cache) and its profile;
#   2. `spp detect --images` on the images of IMAGES_SPLIT (selective search and conv computed live);
#   3. `spp bench` on the same images and about the same windows (the split's first BENCH_IMAGES images and its
#      stored proposals; the IMAGES_SPLIT images with live selective search), same scales, fc type and compression;
#
# then prints detect's seconds per image / bench's pool + fc, --images' seconds per image / (its selective search +
# bench's SPP total), and the seconds from process start to the first image (targets: 1.3, 1.3, 3 s).
#
#   bench/detect_profile.sh RUN_DIR [VOCDEVKIT]
#   FEATURE=softmax SPLIT=val bench/detect_profile.sh data/runs/voc07 ../shared/voc2007/VOCdevkit
#
# The run is not written to: spp detect runs in a scratch run under OUT that links the run's stage folders (all but
# 06_detect, so it always runs afresh). VOCDEVKIT: the folder holding VOC2007/ (default: the run's data.voc_root).
# Env: SPLIT (the run's data.test_split), IMAGES_SPLIT (test_demo if the devkit has it, else SPLIT), FEATURE (ftfc7),
# ONE_SCALE (1: --one-scale; 0: every scale), BBOX (1: --bbox), BENCH_IMAGES (7), REPEATS (3), OUT
# (/tmp/detect_profile), PY (.venv/bin/python). Timings on a shared machine are noisy: the load average is printed.
set -euo pipefail
RUN_DIR=$(realpath "${1:?usage: bench/detect_profile.sh RUN_DIR [VOCDEVKIT]}")
VOC_ARG=${2:+$(realpath "$2")}  # both resolved from the caller's folder, before moving to the repository
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=$(realpath -m "${OUT:-/tmp/detect_profile}")
FEATURE=${FEATURE:-ftfc7}
BENCH_IMAGES=${BENCH_IMAGES:-7}
REPEATS=${REPEATS:-3}
[[ -f "$RUN_DIR/config.json" ]] || { echo "error: $RUN_DIR: not a run (no config.json)" >&2; exit 1; }
config() { "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."): c = c[key]
print(c)' "$RUN_DIR/config.json" "$1"; }
VOC_ROOT=${VOC_ARG:-$(config data.voc_root)}
SPLIT=${SPLIT:-$(config data.test_split)}
if [[ -z "${IMAGES_SPLIT:-}" ]]; then
  IMAGES_SPLIT=$SPLIT
  [[ -f "$VOC_ROOT/VOC2007/ImageSets/Main/test_demo.txt" ]] && IMAGES_SPLIT=test_demo
fi
FC_DTYPE=$(config detect.fc_dtype)
# One look per window, as bench times it: a run's detect.test_flip (the mirrored image scored too) is turned off here.
variant=(--feature "$FEATURE" --set detect.test_flip=false)
[[ "${ONE_SCALE:-1}" == 1 ]] && variant+=(--one-scale) && MODE=spp_1scale || MODE=spp_5scale
[[ "${BBOX:-1}" == 1 ]] && variant+=(--bbox) || variant+=(--no-bbox)

# The scratch run: the run's stage folders linked (read only by detect), its config copied (detect saves it).
name=$(basename "$RUN_DIR")
scratch="$OUT/runs/$name"
rm -rf "${OUT:?}/runs" "$OUT/images" "$OUT"/*.json
mkdir -p "$scratch" "$OUT/images"
for stage in "$RUN_DIR"/[0-9][0-9]_*; do
  [[ "$(basename "$stage")" == 06_detect ]] || ln -s "$stage" "$scratch/"
done
cp "$RUN_DIR/config.json" "$scratch/"
common=(--run "$name" --runs-root "$OUT/runs" --voc-root "$VOC_ROOT")
mapfile -t images < <(sed "s|^\(.*\)$|$VOC_ROOT/VOC2007/JPEGImages/\1.jpg|" \
                      "$VOC_ROOT/VOC2007/ImageSets/Main/$IMAGES_SPLIT.txt")

echo "== $(date '+%F %T'), load average $(cut -d' ' -f1-3 /proc/loadavg); busiest processes:"
ps -eo pcpu=,etime=,args= --sort=-pcpu | head -4 | cut -c1-140 | sed 's/^/     /'
echo "== spp detect --split $SPLIT ${variant[*]}"
"$PY" -m sppcli detect "${common[@]}" --split "$SPLIT" "${variant[@]}"
tag_dir=$(ls -d "$scratch"/06_detect/*/ | head -1)
echo "== spp detect --images (${#images[@]} images of $IMAGES_SPLIT) ${variant[*]}"
"$PY" -m sppcli detect "${common[@]}" "${variant[@]}" --images "${images[@]}" --out "$OUT/images"

windows() {  # mean windows per image of a profile, for bench's --windows
  "$PY" -c 'import json, sys; p = json.load(open(sys.argv[1]))
p = p["metrics"]["profile"] if "metrics" in p else p["profile"]
print(max(1, round(p["counts"].get("windows", 0) / max(p["images"], 1))))' "$1"
}
echo "== spp bench on $BENCH_IMAGES images of $SPLIT ($(windows "$tag_dir/MANIFEST.json") windows each)"
"$PY" -m sppcli bench "${common[@]}" --set "data.test_split=$SPLIT" --num-images "$BENCH_IMAGES" \
  --windows "$(windows "$tag_dir/MANIFEST.json")" --repeats "$REPEATS" --fc-dtype "$FC_DTYPE" \
  --json "$OUT/bench_split.json" > "$OUT/bench_split.txt"
if [[ "$IMAGES_SPLIT $BENCH_IMAGES $(windows "$tag_dir/MANIFEST.json")" == \
      "$SPLIT ${#images[@]} $(windows "$OUT/images/detections.json")" ]]; then
  cp "$OUT/bench_split.json" "$OUT/bench_images.json"  # the same images and windows: the same measurement
else
  echo "== spp bench on the ${#images[@]} images of $IMAGES_SPLIT" \
       "($(windows "$OUT/images/detections.json") windows each)"
  "$PY" -m sppcli bench "${common[@]}" --set "data.test_split=$IMAGES_SPLIT" --num-images "${#images[@]}" \
    --windows "$(windows "$OUT/images/detections.json")" --repeats "$REPEATS" --fc-dtype "$FC_DTYPE" \
    --json "$OUT/bench_images.json" > "$OUT/bench_images.txt"
fi
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$tag_dir/MANIFEST.json" "$OUT/images/detections.json" "$OUT/bench_split.json" "$OUT/bench_images.json" \
  "$MODE" "$SPLIT" "$IMAGES_SPLIT" <<'PYEOF'
import json, sys
split_p = json.load(open(sys.argv[1]))["metrics"]["profile"]
images_p = json.load(open(sys.argv[2]))["profile"]
bench_split, bench_images = (json.load(open(p)) for p in sys.argv[3:5])
mode, split, images_split = sys.argv[5:8]

def per_image(p, key="windows"):
    return p["counts"].get(key, 0) / max(p["images"], 1)

ORDER = ("read", "selective_search", "conv", "pool", "fc", "score", "nms", "bbox", "write")  # core.timing's

def phases(p):
    times = sorted(p["per_image"].items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER))
    return ", ".join(f"{k} {v:.3f}" for k, v in times if v >= 0.0005)

b = bench_split["modes"][mode]
pool_fc = b["seconds"]["pool"] + b["seconds"]["fc"]
bi = bench_images["modes"][mode]
search = images_p["per_image"].get("selective_search", 0.0)
rows = [
    (f"spp detect --split {split}", split_p["per_image_s"], pool_fc,
     f"bench {mode} pool {b['seconds']['pool']:.3f} + fc {b['seconds']['fc']:.3f}", 1.3),
    (f"spp detect --images ({images_split})", images_p["per_image_s"], search + bi["seconds"]["total"],
     f"selective search {search:.3f} + bench {mode} total {bi['seconds']['total']:.3f}", 1.3),
]
print(f"\n{'':<34} {'s/image':>8} {'reference':>9} {'ratio':>6} {'target':>6}  reference is")
for label, mine, ref, what, target in rows:
    ratio = mine / ref if ref > 0 else float("inf")
    print(f"{label:<34} {mine:>8.3f} {ref:>9.3f} {ratio:>6.2f} {'<= ' + str(target):>6}  {what}")
for label, p in ((f"--split {split}", split_p), (f"--images ({images_split})", images_p)):
    print(f"start-up {label:<25} {p['first_image_s']:>8.2f} s to the first image (load {p['seconds']['load']:.2f} s;"
          f" target < 3 s); {p['images']} images")
print(f"\nwindows per image: detect --split {per_image(split_p):.0f} "
      f"({per_image(split_p, 'fc_windows'):.0f} through fc),"
      f" bench {b['windows']:.0f} ({b.get('unique_windows', 0):.0f}); --images {per_image(images_p):.0f}"
      f" ({per_image(images_p, 'fc_windows'):.0f}), bench {bi['windows']:.0f} ({bi.get('unique_windows', 0):.0f})")
print(f"detect --split s/image: {phases(split_p)}")
print(f"detect --images s/image: {phases(images_p)}")
for where, m in ((split, b), (images_split, bi)):
    print(f"bench {mode} s/image ({where}): " + ", ".join(f"{k} {m['seconds'][k]:.3f}"
                                                        for k in ("conv", "pool", "fc", "total")))
print(f"bench: {bench_split['threads']} threads, {bench_split['clock']} clock, "
      f"load {bench_split['load_average_before'][0]:.1f}"
      f" -> {bench_split['load_average_after'][0]:.1f}; detect: wall clock, every core")
PYEOF
