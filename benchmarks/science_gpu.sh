#!/usr/bin/env bash
# One device-tool call of the GPU science grid (issue 36; benchmarks/science_gpu/PLAN.md).
#
#   (device tool, carry .whl_app)  bash benchmarks/science_gpu.sh SWEEP [RUN ...]
#                                  (SWEEP: compare, compare_paper_sampler, compare_guidance, ablations)
#   (device tool, carry .whl_app)  [EDIT_ARGS="--pretrain_steps=N --finetune_steps=M"] \
#                                  bash benchmarks/science_gpu.sh edit
#   (or EDIT_ARGS="--start_from=benchmarks/science_gpu/assets/edit_model-NAME.tgz --finetune_steps=M")
#   (device tool, carry .whl_app)  bash benchmarks/science_gpu.sh list SWEEP
#
# SWEEP: runs the named runs of configs/science_gpu/SWEEP.py (all
# not yet stored when none are named) with tfjax-sweep, skipping every run
# stored in benchmarks/science_gpu/runs/ (the ablations also read the
# comparison pilot's, whose `transfusion` runs are theirs). No run starts once fewer
# than RESERVE_S (120) of BUDGET_S (570) seconds since this script started are
# left, nor one whose estimate (configs/science_gpu/common.py TIMING) does not
# fit. Every 10 s, and at the end, $OUT/results.tgz is rewritten whole with
# the runs finished so far:
#   runs/SWEEP/RUN.json       the stored result (tar xzf results.tgz -C benchmarks/science_gpu)
#   samples/SWEEP/RUN_*.png   the run's evaluation sample grids (RUN_VARIANT_*.png: eval variants)
# and $OUT/sweep.log holds the log. The autoencoders (KL-VAE, VQ-VAE) come from
# benchmarks/science_gpu/assets/autoencoders.tgz and the tokenizers from
# assets/tokenizers.tgz when they are there, so every call's runs share the
# same ones; a call that trains one writes $OUT/autoencoders.tgz or
# $OUT/tokenizers.tgz (store it there). Data and latents are rebuilt on a
# fresh machine (deterministic in their seeds; a warm one keeps
# /tmp/science_gpu) and shared by its runs.
# edit: benchmarks/science_gpu_edit.py (pretrain, fine-tune, editing suite)
# under the same budget; $OUT/edit.tgz holds runs/edit/*.json,
# $OUT/edit_commands.log.gz the chain's own log and $OUT/edit_model.tgz the
# fine-tuned model (bfloat16 export, no vae/).
set -uo pipefail
T0=$(date +%s)
what=${1:?usage: science_gpu.sh SWEEP|edit|list [RUN ...]}
shift
OUT=${OUT:-/tmp/science_gpu_out}
BUDGET_S=${BUDGET_S:-570}
RESERVE_S=${RESERVE_S:-120}
STORE=benchmarks/science_gpu
mkdir -p "$OUT"
if [[ -d .whl_app ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl_app/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Runs of one family and shape reuse each other's compiled programs.
export JAX_COMPILATION_CACHE_DIR=/tmp/science_gpu_jax_cache
LOG=$OUT/sweep.log
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"

if [[ $what == list ]]; then
  python3 -m tfjax.cli.sweep --config=configs/science_gpu/$1.py --workdir=/tmp/science_gpu/$1 \
    --list 2>&1 | grep -v "^[IW][0-9]" | tee -a "$LOG"
  exit
fi

# Seconds left of the budget, less ~15 s for the Python start and imports
# before the runner's own clock starts.
left() { echo $(( BUDGET_S - ($(date +%s) - T0) - 15 )); }
WORK=/tmp/science_gpu/$what
# compare_paper_sampler and compare_guidance train on compare's data: on a
# warm machine they reuse the data, tokenizer, latents and codes a compare
# call built (~300 s).
if [[ $what == compare_paper_sampler || $what == compare_guidance ]]; then
  mkdir -p /tmp/science_gpu/compare/shared "$WORK"
  ln -sfn /tmp/science_gpu/compare/shared "$WORK/shared"
fi
mkdir -p "$WORK/shared"
# Stored assets (ASSET.tgz holds shared/GLOB): the autoencoders, and the
# tokenizers (the 100k-scene one took 81-106 s on the H100 machines; the
# data stage keeps one that is there). A call that makes a new one returns
# ASSET.tgz whole.
declare -A ASSETS=([autoencoders]='*/vae' [tokenizers]='data-*/tokenizer')
for a in "${!ASSETS[@]}"; do
  if [[ -f $STORE/assets/$a.tgz ]]; then
    tar xzf "$STORE/assets/$a.tgz" -C "$WORK/shared" || exit 1
  fi
  (cd "$WORK/shared" && ls -d ${ASSETS[$a]} 2>/dev/null | sort) > "/tmp/science_gpu_${a}_before"
done

# pack SRC_RESULTS SWEEP TGZ: the run records (and sample grids) finished in this call.
pack() {
  local stage=/tmp/science_gpu_pack
  rm -rf "$stage" && mkdir -p "$stage/runs/$2" "$stage/samples/$2"
  cp "$1"/*.json "$stage/runs/$2/" 2>/dev/null
  for rec in "$stage/runs/$2"/*.json; do
    [[ -e $rec ]] || continue
    run=$(basename "$rec" .json)
    for png in "$WORK/runs/$run/eval/"*.png; do
      [[ -e $png ]] && cp "$png" "$stage/samples/$2/${run}_$(basename "$png")"
    done
    for png in "$WORK/runs/$run/eval/"*/*.png; do  # eval variants: eval/NAME/*.png
      [[ -e $png ]] && cp "$png" "$stage/samples/$2/${run}_$(basename "$(dirname "$png")")_$(basename "$png")"
    done
  done
  cp "$WORK"/grids/*.png "$stage/samples/$2/" 2>/dev/null
  tar czf "$3.tmp" -C "$stage" runs samples && mv "$3.tmp" "$3"
}

if [[ $what == edit ]]; then
  python3 benchmarks/science_gpu_edit.py --workdir="$WORK" --results_dir="$WORK/results" \
    --stored_dir="$STORE/runs/edit" --time_budget_s="$(left)" ${EDIT_ARGS:-} >> "$LOG" 2>&1 &
  pid=$!
  results=$WORK/results
  tgz=$OUT/edit.tgz
else
  dirs=$WORK/results,$STORE/runs/$what
  [[ $what == ablations ]] && dirs=$dirs,$STORE/runs/compare_pilot
  only=()
  [[ $# -gt 0 ]] && only=("--only=$(IFS=,; echo "$*")")
  python3 -m tfjax.cli.sweep --config="configs/science_gpu/$what.py" --workdir="$WORK" \
    --results_dir="$dirs" --time_budget_s="$(left)" --reserve_s="$RESERVE_S" --keep_going "${only[@]}" \
    >> "$LOG" 2>&1 &
  pid=$!
  results=$WORK/results
  tgz=$OUT/results.tgz
fi
mkdir -p "$results"
while kill -0 $pid 2>/dev/null; do
  sleep 10
  pack "$results" "$what" "$tgz"
done
wait $pid
rc=$?
pack "$results" "$what" "$tgz"
# The edit chain's commands write their own log (training, export, evaluation),
# and its fine-tuned model comes back without the VAE (the stored 10k-scene KL-VAE).
[[ -f $WORK/edit_commands.log ]] && gzip -c "$WORK/edit_commands.log" > "$OUT/edit_commands.log.gz"
[[ -d $WORK/ft_export ]] && tar czf "$OUT/edit_model.tgz" -C "$WORK" --exclude=ft_export/vae ft_export
for a in "${!ASSETS[@]}"; do
  (cd "$WORK/shared" && ls -d ${ASSETS[$a]} 2>/dev/null | sort) > "/tmp/science_gpu_${a}_after"
  if ! cmp -s "/tmp/science_gpu_${a}_before" "/tmp/science_gpu_${a}_after"; then
    (cd "$WORK/shared" && tar czf "$OUT/$a.tgz" ${ASSETS[$a]})
  fi
done
echo "science_gpu.sh $what: exit $rc after $(( $(date +%s) - T0 )) s; stored this call:"
ls "$results"
grep -E "not started|stored |failed|Error|error:" "$LOG" | tail -n 40
exit $rc
