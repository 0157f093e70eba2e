#!/usr/bin/env bash
# Device call: the Mosaic GPU backward tests (GQA, padding) on the GPU, then
# the attention table with the default (all-Mosaic) kernels, no tokamax.
#   (device tool)  bash benchmarks/mgpu_final.sh
set -uo pipefail
OUT=${OUT:-/tmp/mgpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "=== Mosaic backward tests on the GPU"
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention_mosaic.py \
  -k "mosaic_backward_matches" 2>&1 | tee "$OUT/tests.log" | tail -6
echo "=== attention.py --no_tokamax"
timeout ${TABLE_TIMEOUT:-290} python3 benchmarks/attention.py --no_tokamax --seqs 8192,4096 \
  --dims 128,64 2>&1 | tee "$OUT/table.log" | grep -E "ROW|^ +[0-9]+/|speedup|^\{|Error|FAILED"
