#!/usr/bin/env bash
# One device-tool call that produces the GPU figures of benchmarks/RESULTS.md
# (training, VAE, generation) and runs the CPU test suite's core on the GPU.
#
#   (device tool, carry .whl_app)  bash benchmarks/gpu_run.sh [all|tests|kernels|train|vae|latents|trainer|generate]
#   (device tool, carry .whl_app and .whl)  [SEQS=8192] [REPS=15] bash benchmarks/gpu_run.sh attention
#
# .whl_app holds the wheels the GPU image lacks (grain, ml_collections,
# tensorflow-datasets, array_record and their small dependencies); .whl holds
# tokamax and what it imports (xprof, pydantic, qwix, ...) for the attention
# table's tokamax row. `attention` is not part of `all`: the table alone needs
# most of a 600 s call.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/tfjax_gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl_app/*.whl || exit 1
if [[ $what == attention && -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
LOG=$OUT/gpu_run.log
python3 -c "import sys, jax, jaxlib, flax, optax, orbax.checkpoint as o, grain, torch
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__,
      'flax', flax.__version__, 'optax', optax.__version__, 'grain', grain.__version__,
      'torch', torch.__version__); print(jax.devices())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"

section() { echo; echo "=== $1"; } 
run() { echo "+ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG" | grep -E "^\{|^PARTIAL|passed|failed|error|Error|tokens_per_s|images_per_s|\|" | tail -n 30; }

if [[ $what == all || $what == tests ]]; then
  section "core tests on the GPU (float32 matmuls at full precision: TF32 would fail 1e-5 checks)"
  JAX_DEFAULT_MATMUL_PRECISION=highest run python3 -m pytest -q -p no:cacheprovider \
    tests/test_mask_attention.py tests/test_model.py tests/test_diffusion.py \
    tests/test_losses.py tests/test_config.py
fi
if [[ $what == kernels ]]; then
  section "attention kernel tests against the real Hopper kernels (about 300 s on an H200)"
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false run python3 -m pytest \
    -n 4 -q -p no:cacheprovider tests/test_attention_mosaic.py tests/test_attention_kernels.py \
    -k "mosaic or plan or gpu"
fi
if [[ $what == all || $what == train ]]; then
  section "training throughput, sequence 4096"
  for cfg in 160m 370m; do
    for impl in xla pallas; do
      run python3 benchmarks/train.py --config=configs/transfusion_$cfg.py --seq_len=4096 \
        --batch_size=8 --steps=10 --config.model.attention_impl=$impl
    done
  done
fi
if [[ $what == attention ]]; then
  section "attention table, every peer in one run (PARTIAL JSON after each shape)"
  run python3 benchmarks/attention.py --seqs ${SEQS:-8192,4096} --dims 128,64 --reps ${REPS:-15}
fi
if [[ $what == all || $what == vae ]]; then
  section "VAE encode/decode at 256x256"
  run python3 benchmarks/vae.py --config=configs/vae_f8c8.py --batch=32
fi
if [[ $what == all || $what == vae || $what == latents ]]; then
  section "the latent job (WebDataset JPEG shards -> bf16 ArrayRecord) beside encode-only"
  run python3 benchmarks/data_latents.py --config=configs/vae_f8c8.py --batch=32 \
    --images=4096 --threads=16
fi
if [[ $what == trainer ]]; then
  section "tfjax-train's logged tokens/s against benchmarks/train.py, 0.37B GPU default"
  run python3 benchmarks/train.py --config=configs/transfusion_370m.py --seq_len=4096 --steps=10
  rm -rf /tmp/wd370 && run python3 -m tfjax.cli.train --config=configs/transfusion_370m.py \
    --workdir=/tmp/wd370 --stages=train --config.train.synthetic_data=true \
    --config.data.batch_size=16 --config.train.num_steps=41 --config.train.log_every=10 \
    --config.train.eval_every=0 --config.train.checkpoint_every=0
  grep tokens_per_s /tmp/wd370/metrics.jsonl | tail -n 3 | tee -a "$LOG"
fi
if [[ $what == all || $what == generate ]]; then
  section "generation, 0.16B, 256-patch images, 250 steps, CFG"
  run python3 benchmarks/generate.py --config=configs/transfusion_160m.py
fi
