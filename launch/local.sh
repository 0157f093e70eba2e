#!/bin/bash
# A local run: every stage of the main job on this machine's CPU or GPUs.
#
#   launch/local.sh configs/tiny.py /tmp/tfjax_tiny [--config.train.num_steps=500 ...]
#   launch/local.sh --dry-run configs/tiny.py /tmp/tfjax_tiny     # print the command only
#
# Output goes to the terminal and WORKDIR/train.log; re-running resumes.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: launch/local.sh [--dry-run] CONFIG WORKDIR [tfjax-train flags]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
CMD=(tfjax-train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if ! command -v tfjax-train >/dev/null 2>&1; then
  CMD=(python -m tfjax.cli.train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "mkdir -p $WORKDIR"
  printf '%q ' "${CMD[@]}"; echo "2>&1 | tee -a $WORKDIR/train.log"
  exit 0
fi
mkdir -p "$WORKDIR"
"${CMD[@]}" 2>&1 | tee -a "$WORKDIR/train.log"
