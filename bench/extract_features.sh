#!/usr/bin/env bash
# Benchmark `spp extract-features`: images/s, peak RSS and HDF5 bytes per image for ZF-5 and MobileNetV2
# at 1 scale (688) and 5 scales (480,576,688,874,1200), on N real VOC 2007 images, on this machine's device.
#
#   bench/extract_features.sh [N_IMAGES=10] [SPLIT_LIST=val]
#
# Environment: VOC (VOCdevkit holding VOC2007/, default ../shared/voc2007/VOCdevkit), BENCH_DIR (scratch,
# default /tmp/sppbench), DEVICE (auto|cpu|cuda, default auto), FLIP=1 to also store flipped maps (training split).
# The VOCdevkit is read-only here, so the first N ids of SPLIT_LIST are copied (image + annotation) into a scratch
# devkit with its own split list "bench". ZF-5 has no ImageNet weights on these machines: its speed is measured
# with a seeded random trunk (the same FLOPs; bytes/image differ from a trained net, whose conv5 is sparser).
# MobileNetV2 uses the offline ImageNet weights. Each configuration is a fresh run (nothing resumed).
set -euo pipefail
cd "$(dirname "$0")/.."
N_IMAGES=${1:-10}
SPLIT_LIST=${2:-val}
VOC=${VOC:-../shared/voc2007/VOCdevkit}
BENCH_DIR=${BENCH_DIR:-/tmp/sppbench}
DEVICE=${DEVICE:-auto}
PY=${PY:-.venv/bin/python}
MNV2_WEIGHTS=${MNV2_WEIGHTS:-../shared/weights/mobilenet_v2_imagenet_features.pt}

devkit="$BENCH_DIR/devkit"
mkdir -p "$devkit/VOC2007/JPEGImages" "$devkit/VOC2007/Annotations" "$devkit/VOC2007/ImageSets/Main"
head -n "$N_IMAGES" "$VOC/VOC2007/ImageSets/Main/$SPLIT_LIST.txt" > "$devkit/VOC2007/ImageSets/Main/bench.txt"
while read -r id; do
  cp "$VOC/VOC2007/JPEGImages/$id.jpg" "$devkit/VOC2007/JPEGImages/"
  cp "$VOC/VOC2007/Annotations/$id.xml" "$devkit/VOC2007/Annotations/"
done < "$devkit/VOC2007/ImageSets/Main/bench.txt"

zf5_weights="$BENCH_DIR/zf5_random_seed0.pt"
"$PY" -c "import sys, torch; from stages.core import nets; torch.manual_seed(0);
torch.save(nets.build_backbone('zf5').body.state_dict(), sys.argv[1])" "$zf5_weights"

split=bench
# Flipped maps are stored only for the training split: make "bench" the training split to include them.
train_split=trainval
if [[ "${FLIP:-0}" == 1 ]]; then train_split=bench; fi

bench_one() {  # name backbone weights scales
  local name=$1 backbone=$2 weights=$3 scales=$4
  rm -rf "$BENCH_DIR/runs/$name"
  echo "== $name: backbone=$backbone scales=$scales  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" -m sppcli extract-features --run "$name" --runs-root "$BENCH_DIR/runs" --dataset voc2007 \
    --voc-root "$devkit" --device "$DEVICE" --split "$split" --scales "$scales" \
    --set model.backbone="$backbone" --set model.weights="$weights" --set data.train_split="$train_split" 2>/dev/null
  echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" - "$BENCH_DIR/runs/$name/02_features/$split/MANIFEST.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print("   RESULT " + json.dumps({k: m.get(k) for k in ("images", "seconds", "images_per_s", "peak_rss_mb",
      "rss_before_images_mb", "peak_cuda_mb", "bytes_per_image", "file_bytes", "device", "flip")}))
EOF
}

echo "machine: $(nproc) cores; $(uptime)"
bench_one zf5-s1 zf5 "$zf5_weights" 688
bench_one zf5-s5 zf5 "$zf5_weights" 480,576,688,874,1200
bench_one mnv2-s1 mobilenet_v2 "$MNV2_WEIGHTS" 688
bench_one mnv2-s5 mobilenet_v2 "$MNV2_WEIGHTS" 480,576,688,874,1200
echo "done: $(uptime)"
