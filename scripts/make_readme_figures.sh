#!/usr/bin/env bash
# Regenerate the pictures of the README's "Look inside" section from a trained run.
#
#   scripts/make_readme_figures.sh RUN_DIR VAL_DATA [IMAGE] [OUT_DIR]
#
# RUN_DIR   a training run (uses RUN_DIR/best, else RUN_DIR/final; RUN_DIR/metrics.jsonl for the curves)
# VAL_DATA  validation annotations (COCO JSON / folder, YOLO, VOC) for the query-slot figure
# IMAGE     the picture to annotate and look inside (default: the first validation image)
# OUT_DIR   where the pictures go (default docs/images)
# Environment: THRESHOLD (default 0.5) for detections, TOPK (default: no limit) detections per image,
# DEVICE (default cpu), PYTHON (default: the repository's .venv python when present).
set -euo pipefail

RUN=${1:?usage: $0 RUN_DIR VAL_DATA [IMAGE] [OUT_DIR]}
VAL=${2:?usage: $0 RUN_DIR VAL_DATA [IMAGE] [OUT_DIR]}
IMAGE=${3:-}
OUT=${4:-docs/images}
THRESHOLD=${THRESHOLD:-0.5}
DEVICE=${DEVICE:-cpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
DETRKIT="$PY -m detrkit.cli"

WEIGHTS="$RUN/best"
[ -e "$WEIGHTS/model.safetensors" ] || WEIGHTS="$RUN/final"
if [ -z "$IMAGE" ]; then
  IMAGE=$("$PY" -c 'import sys; from detrkit.data.formats import load_annotations
print(load_annotations(sys.argv[1]).images[0].file)' "$VAL")
fi
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. detections drawn on the image
$DETRKIT predict "$IMAGE" --weights "$WEIGHTS" --out "$TMP/pred" --threshold "$THRESHOLD" ${TOPK:+--top-k "$TOPK"} --device "$DEVICE" --no-progress
for f in "$TMP"/pred/*; do cp "$f" "$OUT/predict_example.${f##*.}"; done
# 2. what each query slot predicts over the validation set (paper Fig. 7), and slot usage
$DETRKIT viz queries --weights "$WEIGHTS" --data "$VAL" --out "$OUT/queries.png" --threshold "$THRESHOLD" --device "$DEVICE"
# 3. decoder attention per detection, encoder attention per point
$DETRKIT viz attention "$IMAGE" --weights "$WEIGHTS" --out "$OUT/attention.png" --threshold "$THRESHOLD" --device "$DEVICE" --dpi 90
# 4. training curves
$DETRKIT viz curves "$RUN" --out "$OUT/curves.png"
ls -l "$OUT"
