#!/usr/bin/env bash
# Device call: Mosaic forward/backward checks and timings, the Mosaic GPU
# tests, then the full attention table (no tokamax), with the Mosaic
# backward where it beat the Triton one at every shape.
#   (device tool)  bash benchmarks/mgpu_run3.sh
set -uo pipefail
OUT=${OUT:-/tmp/mgpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "=== sweep"
timeout ${DEV_TIMEOUT:-170} python3 benchmarks/mgpu_dev.py --configs "64,128,2,1" --reps 20 \
  --bwd "${BWD:-64,64,2,64,64,2;64,64,3,64,128,2}" --best_file "$OUT/best_bwd" 2>&1 \
  | tee "$OUT/dev.log" | grep -E "^[0-9]|SUMMARY|FAILED|Error|best"
echo "=== Mosaic tests on the GPU"
timeout ${TEST_TIMEOUT:-130} python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_attention_kernels.py \
  -k "mosaic" 2>&1 | tee "$OUT/tests.log" | tail -8
[[ -s $OUT/best_bwd ]] && export TFJAX_MOSAIC_BWD=$(cat "$OUT/best_bwd") || export TFJAX_MOSAIC_BWD=0
echo "=== attention.py --no_tokamax  (TFJAX_MOSAIC_BWD=$TFJAX_MOSAIC_BWD)"
timeout ${TABLE_TIMEOUT:-270} python3 benchmarks/attention.py --no_tokamax 2>&1 | tee "$OUT/table.log" \
  | grep -v "WARNING\|Deprecat\|warn(" | tail -32
