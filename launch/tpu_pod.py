#!/usr/bin/env python3
"""Cloud TPU VM pods: create, copy the code, run on every worker, collect logs.

Every action prints the gcloud commands it runs; --dry-run prints them only.

  launch/tpu_pod.py create --name=tfjax-pod --zone=us-east5-a --type=v5p-128
  launch/tpu_pod.py copy   --name=tfjax-pod --zone=us-east5-a
  launch/tpu_pod.py run    --name=tfjax-pod --zone=us-east5-a \
      --config=configs/transfusion.py:160m --workdir=/mnt/runs/160m -- \
      --config.train.num_steps=250000
  launch/tpu_pod.py logs   --name=tfjax-pod --zone=us-east5-a --out=logs/
  launch/tpu_pod.py delete --name=tfjax-pod --zone=us-east5-a

`run` starts the same tfjax-train command on all workers (one process per
host; jax.distributed finds the pod by itself) under nohup, logging to
~/tfjax-train.log on each worker, and starts it again whenever it exits 75
(pre-empted after saving a checkpoint: it resumes); `logs` copies the logs back. WORKDIR must
be one directory every worker sees (a gcsfuse-mounted bucket or a Filestore
share): all hosts write their shards of each checkpoint into it.
Needs only the Python standard library and gcloud.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REMOTE_DIR = "~/tfjax"
REMOTE_LOG = "~/tfjax-train.log"
EXIT_PREEMPTED = 75  # tfjax.train.preemption.EXIT_PREEMPTED (this script needs only the stdlib)


def _base() -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm"]


def _where(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def resume_loop(train: list[str], max_resumes: int = 100) -> str:
  """A shell loop running `train` again while it exits EXIT_PREEMPTED (75:
  stopped by SIGTERM after saving a checkpoint), at most max_resumes times.
  When the VM itself goes down the loop goes with it: `run` again resumes."""
  return (f"n=0; while :; do {shlex.join(train)}; rc=$?; "
          f"if [ $rc -ne {EXIT_PREEMPTED} ] || [ $n -ge {max_resumes} ]; then exit $rc; fi; "
          f"n=$((n+1)); echo \"tfjax-train pre-empted (exit {EXIT_PREEMPTED}); resuming ($n)\"; "
          f"sleep 10; done")


def commands(args, extra: list[str]) -> list[list[str]]:
  """The gcloud command lines for one action."""
  base, where = _base(), _where(args)
  ssh = base + ["ssh", args.name] + where + ["--worker=all"]
  if args.action == "create":
    cmd = base + ["create", args.name] + where + [f"--accelerator-type={args.type}",
                                                   f"--version={args.version}"]
    if args.spot:
      cmd.append("--spot")
    return [cmd]
  if args.action == "copy":
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [ssh + [f"--command=mkdir -p {REMOTE_DIR}"],
            base + ["scp", "--recurse", f"{here}/tfjax", f"{here}/configs", f"{here}/setup.py",
                    f"{here}/README.md", f"{args.name}:{REMOTE_DIR}"] + where + ["--worker=all"],
            ssh + [f"--command=cd {REMOTE_DIR} && pip install -q -e '.[tpu]'"]]
  if args.action == "run":
    if not args.config or not args.workdir:
      raise SystemExit("run needs --config and --workdir")
    train = ["tfjax-train", f"--config={args.config}", f"--workdir={args.workdir}",
             f"--stages={args.stages}"] + extra
    remote = (f"cd {REMOTE_DIR} && nohup bash -c {shlex.quote(resume_loop(train))} "
              f"> {REMOTE_LOG} 2>&1 &")
    return [ssh + [f"--command={remote}"]]
  if args.action == "logs":
    if not args.dry_run:
      os.makedirs(args.out, exist_ok=True)
    return [base + ["scp", f"{args.name}:{REMOTE_LOG}",
                    os.path.join(args.out, f"worker{w}.log")] + where + [f"--worker={w}"]
            for w in range(args.workers)]
  if args.action == "delete":
    return [base + ["delete", args.name] + where + ["--quiet"]]
  raise SystemExit(f"unknown action {args.action}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=["create", "copy", "run", "logs", "delete"],
                 help="what to do with the pod")
  p.add_argument("--name", required=True, help="TPU VM (pod slice) name")
  p.add_argument("--zone", required=True, help="GCP zone, e.g. us-east5-a")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--type", default="v5p-128", help="accelerator type for create")
  p.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM software version")
  p.add_argument("--spot", action="store_true", help="create a spot (preemptible) pod")
  p.add_argument("--config", default="", help="config file for run, e.g. configs/transfusion.py:160m")
  p.add_argument("--workdir", default="", help="run directory for run (gs:// on pods)")
  p.add_argument("--stages", default="train", help="tfjax-train --stages for run")
  p.add_argument("--workers", type=int, default=16, help="worker hosts to fetch logs from")
  p.add_argument("--out", default="logs", help="local directory for logs")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
  args, extra = parse(sys.argv[1:] if argv is None else argv)
  for cmd in commands(args, extra):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.call(cmd)
      if rc:
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
