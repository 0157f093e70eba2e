"""The runner every job shares: named stages in order, each skipped when done, timed.

A job (transfusion.py, chameleon.py, sweep.py) is a chain of `Stage`s and
`Barrier`s over one `Job` value: the config, the workdir and where the
stages' outputs go. `run_stages` runs the chosen stages in order on the
processes each names, skips a stage whose `done` says its output is current,
and records each stage's seconds in WORKDIR/stage_seconds.json and the log
("stage seconds"). SIGTERM or SIGINT between stages raises `Preempted` (exit
75); inside the train stage the loop saves first (tfjax/train/preemption.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.experimental import multihost_utils

import tfjax.vae
from tfjax.train.preemption import StopSignals

log = logging.getLogger(__name__)

SECONDS_FILE = "stage_seconds.json"
CPU_SECONDS_FILE = "stage_cpu_seconds.json"


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children: beside
  wall time, a stage's cost that other work on a shared machine inflates little
  (wall on a free machine is about this over the cores the stage keeps busy)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass
class Job:
  """One run of a chain: its config, directories and what stages hand on.

  config: every path key absolute, the job's assets (VAE, latent or token
    cache) wired in; the stages from latents on read it.
  base_config: the config before that wiring, which the data and VAE stages
    read (default: config).
  vae_dir: where the (VQ-)VAE is or will be; vae_workdir: where the VAE stage
    trains it (VAE_WORKDIR/vae).
  """
  config: ml_collections.ConfigDict
  workdir: str
  stages: tuple[str, ...]
  vae_dir: str
  vae_workdir: str
  base_config: ml_collections.ConfigDict | None = None
  devices: Any = None
  num_samples: int = 32                     # the samples stage's held-out examples
  eval: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_samples": 32})
  sample_during_training: bool = False      # train.sample_every grids (the main job)
  _vae: Any = dataclasses.field(default=None, repr=False)

  def vae(self) -> Any:
    """The (VQ-)VAE at vae_dir, loaded once."""
    if self._vae is None:
      self._vae = tfjax.vae.load(self.vae_dir)
    return self._vae

  @property
  def assets_config(self) -> ml_collections.ConfigDict:
    return self.config if self.base_config is None else self.base_config


def everywhere(job: Job) -> bool:
  del job
  return True


def primary(job: Job) -> bool:
  """Process 0 only: what it writes, the others read (after a Barrier)."""
  del job
  return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Stage:
  """A named step. run(job) -> what the results record; done(job) -> True when
  its output is current and it is skipped (None: the stage reuses what exists
  itself); where(job) -> whether this process runs it."""
  name: str
  run: Callable[[Job], Any]
  done: Callable[[Job], bool] | None = None
  where: Callable[[Job], bool] = everywhere


@dataclasses.dataclass(frozen=True)
class Barrier:
  """On several processes, all wait here (whether or not the stages around it
  were chosen) when when(job)."""
  name: str
  when: Callable[[Job], bool] = everywhere


def names(chain: Sequence[Stage | Barrier]) -> tuple[str, ...]:
  return tuple(s.name for s in chain if isinstance(s, Stage))


def check_stages(stages: Sequence[str], chain: Sequence[Stage | Barrier]) -> None:
  """Raises naming the unknown ones when `stages` are not all in the chain."""
  known = names(chain)
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; known: {known}")


def run_stages(chain: Sequence[Stage | Barrier], job: Job) -> dict[str, Any]:
  """Runs job.stages in chain order; returns {stage: result, "seconds": {stage: s},
  "cpu_seconds": {stage: s}}.

  The seconds of stages run earlier in this workdir (stage_seconds.json,
  stage_cpu_seconds.json) are kept, so after a resumed run the files cover
  every stage.
  """
  check_stages(job.stages, chain)
  results: dict[str, Any] = {"seconds": {}, "cpu_seconds": {}}
  for key, name in (("seconds", SECONDS_FILE), ("cpu_seconds", CPU_SECONDS_FILE)):
    path = os.path.join(job.workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        results[key].update(json.load(f))
  with StopSignals(defer=False):  # a signal outside training stops at once (exit 75)
    for item in chain:
      if isinstance(item, Barrier):
        if jax.process_count() > 1 and item.when(job):
          multihost_utils.sync_global_devices(f"tfjax job: {item.name}")
      elif item.name in job.stages and item.where(job):
        if item.done is not None and item.done(job):
          log.info("stage %s: its output is current; skipping", item.name)
          continue
        _timed(item, job, results)
  log.info("stage seconds: %s", results["seconds"])
  log.info("stage CPU seconds: %s", results["cpu_seconds"])
  return results


def _timed(stage: Stage, job: Job, results: dict[str, Any]) -> None:
  t0, c0 = time.time(), cpu_seconds()
  log.info("=== stage %s ===", stage.name)
  results[stage.name] = stage.run(job)
  results["seconds"][stage.name] = round(time.time() - t0, 1)
  results["cpu_seconds"][stage.name] = round(cpu_seconds() - c0, 1)
  if jax.process_index() == 0:
    for key, name in (("seconds", SECONDS_FILE), ("cpu_seconds", CPU_SECONDS_FILE)):
      with open(os.path.join(job.workdir, name), "w") as f:
        json.dump(results[key], f, indent=2)
  log.info("=== stage %s done in %.1fs (%.1f CPU s) ===", stage.name,
           results["seconds"][stage.name], results["cpu_seconds"][stage.name])
