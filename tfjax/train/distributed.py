"""Multi-host start-up: `jax.distributed.initialize` when a launcher asks for it.

Launchers (launch/slurm.sbatch, launch/tpu_pod.py) set either the variables
JAX reads itself (Cloud TPU pods need none; SLURM is detected by JAX's cluster
plugins) or TFJAX_COORDINATOR / TFJAX_NUM_PROCESSES / TFJAX_PROCESS_ID for a
hand-rolled cluster. One process per host (TPU) or per node/GPU (SLURM).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def wanted(mode: str) -> bool:
  """mode: "auto" (initialize when a cluster is detected), "on", "off"."""
  if mode == "off":
    return False
  if mode == "on":
    return True
  env = os.environ
  if "TFJAX_COORDINATOR" in env:
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Cloud TPU VM pods: more than one worker host listed.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(mode: str = "auto") -> None:
  """Calls jax.distributed.initialize once, with explicit settings if given."""
  if not wanted(mode):
    return
  env = os.environ
  if "TFJAX_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["TFJAX_COORDINATOR"],
                               num_processes=int(env["TFJAX_NUM_PROCESSES"]),
                               process_id=int(env["TFJAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()  # SLURM / TPU pods: JAX reads the environment
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
