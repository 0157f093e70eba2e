#!/bin/bash
# A local run: every stage of the main job on this machine's CPU or GPUs.
#
#   launch/local.sh configs/tiny.py /tmp/tfjax_tiny [--config.train.num_steps=500 ...]
#   launch/local.sh --dry-run configs/tiny.py /tmp/tfjax_tiny     # print the command only
#
# Output goes to the terminal and WORKDIR/train.log; re-running resumes.
# Exit status 75 from tfjax-train means "pre-empted: checkpoint saved, resume me".
# When tfjax-train alone was stopped (its process got SIGTERM), this script
# resumes it (at most TFJAX_MAX_RESUMES times, default 100); when this script
# got SIGTERM/SIGINT (Ctrl-C, a VM shutting down) it waits for the save and
# exits 75 too, so whatever started it can resume it.
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
EXIT_PREEMPTED=75
MAX_RESUMES=${TFJAX_MAX_RESUMES:-100}
CMD=(tfjax-train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if ! command -v tfjax-train >/dev/null 2>&1; then
  CMD=(python -m tfjax.cli.train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "mkdir -p $WORKDIR"
  printf '%q ' "${CMD[@]}"; echo "2>&1 | tee -a $WORKDIR/train.log"
  echo "# exit $EXIT_PREEMPTED (pre-empted, checkpoint saved): run again, at most $MAX_RESUMES times"
  exit 0
fi
mkdir -p "$WORKDIR"
STOP=0
PID=""
# Forward a stop request to tfjax-train (which saves, then exits 75), and do
# not resume afterwards. tee ignores the signals so the save's log lines still
# reach train.log.
trap 'STOP=1; [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null || true' TERM INT
resumes=0
set +e
while :; do
  "${CMD[@]}" > >(trap '' TERM INT; exec tee -a "$WORKDIR/train.log") 2>&1 &
  PID=$!
  wait "$PID"; rc=$?
  while kill -0 "$PID" 2>/dev/null; do wait "$PID"; rc=$?; done  # a trapped signal ends wait early
  if [[ $rc != "$EXIT_PREEMPTED" || $STOP == 1 || $resumes -ge $MAX_RESUMES ]]; then
    exit "$rc"
  fi
  resumes=$((resumes + 1))
  echo "launch/local.sh: tfjax-train was pre-empted (exit $EXIT_PREEMPTED); resuming ($resumes)" \
    | tee -a "$WORKDIR/train.log"
done
