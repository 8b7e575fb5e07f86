#!/usr/bin/env bash
# The GPU benchmark: CUDA float32, bf16 autocast and torch.compile rows, transformers float32 with the
# same weights, a training step, matcher and COCO eval. One table, written to $OUT/gpu.md (or
# benchmarks/results/gpu.md) and printed.
#   benchmarks/gpu.sh            full run (batch 1 and 4, 5 timed rounds, compile rows)   ~5-8 min
#   benchmarks/gpu.sh --quick    batch 1, 3 timed rounds, compile rows                    ~2-4 min
# Env: PYTHON (default .venv/bin/python, else python3), BENCH_TIMEOUT seconds (default 540).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
EXTRA=()
[[ "${1:-}" == "--quick" ]] && EXTRA+=(--quick)
# transformers (and timm for its backbone) are optional: without them the HF rows are skipped
if ! "$PY" -c "import transformers, timm" 2>/dev/null; then EXTRA+=(--no-hf); fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout "${BENCH_TIMEOUT:-540}" "$PY" -m detrkit.bench --device cuda --compile "${EXTRA[@]}" \
  --out "$DEST/gpu.md" 2>&1 | tee "$DEST/gpu.log"
