#!/usr/bin/env bash
# Runs benchmarks/train.py once per line of a run file (flags after the config
# name), each in its own process (so peak memory is the run's own), with a
# time limit per run; prints the table rows and keeps every JSON line.
#
#   (device tool, carry .whl_app)  bash benchmarks/step_sweep.sh benchmarks/step_runs/NAME.txt
set -uo pipefail
runs=$1
OUT=${OUT:-/tmp/tfjax_gpu_out}
mkdir -p "$OUT"
if [[ -d .whl_app ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl_app/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
git log -1 --format='commit %h %s' 2>/dev/null
name=$(basename "$runs" .txt)
while read -r cfg rest; do
  [[ -z $cfg || $cfg == \#* ]] && continue
  echo "+ train.py --config=configs/$cfg.py $rest" >> "$OUT/$name.log"
  timeout "${RUN_LIMIT:-150}" python3 benchmarks/train.py --config=configs/$cfg.py \
    --seq_len=4096 --steps=${STEPS:-6} --warmup=1 $rest >> "$OUT/$name.log" 2>&1
  rc=$?
  if [[ $rc != 0 ]]; then
    echo "| $cfg $rest | FAILED rc=$rc: $(grep -E 'Error|error' "$OUT/$name.log" | tail -n 1 | cut -c1-200)"
  else
    tail -n 2 "$OUT/$name.log" | head -n 1
    tail -n 1 "$OUT/$name.log" >> "$OUT/$name.jsonl"
  fi
done < "$runs"
grep -A14 "^| part" "$OUT/$name.log" | head -n 60
