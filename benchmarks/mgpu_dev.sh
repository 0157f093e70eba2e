#!/usr/bin/env bash
# One device call for the Mosaic GPU forward: tile sweep + checks, then the
# kernel tests on the GPU.  (device tool)  bash benchmarks/mgpu_dev.sh [dev-args...]
set -uo pipefail
OUT=${OUT:-/tmp/mgpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__)"
timeout ${DEV_TIMEOUT:-330} python3 benchmarks/mgpu_dev.py "$@" 2>&1 | tee "$OUT/dev.log" | grep -v "^WARNING\|DeprecationWarning\|warnings.warn"
echo "=== tests on the GPU"
[[ ${TEST_TIMEOUT:-200} == 0 ]] && exit 0
# The float32 mixed-tile Triton test compiles for minutes on the GPU: left to CPU CI.
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_attention_mosaic.py tests/test_attention_kernels.py -k "${TEST_K:-not mixed_tiles}" 2>&1 | tee "$OUT/tests.log" | tail -25
