"""The embedded main job: every stage from nothing to a report, each reused if done.

  data       dataset + tokenizer          tfjax.data.build_all        DIR/data
  vae        image autoencoder            tfjax.vae.train.train_vae   DIR/vae
  latents    VAE latents of the images    tfjax.data.build_latents    DIR/data/latents
  train      the Transfusion model        tfjax.train.loop.train      DIR/checkpoints
  samples    images from held-out captions, captions from held-out images
                                                                      DIR/samples
  report     DIR/report.md: sample grid, loss curves, scores

`tfjax-train --config=configs/tiny.py --workdir=DIR` runs them all; a stage
whose output exists is skipped (the train stage resumes), so re-running after
an interruption continues where it stopped. SIGTERM or SIGINT ends the whole
job (after the train stage's save) with `Preempted`: later stages do not run.
Dataset and VAE are built once, by process 0; other hosts wait.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections

from tfjax.config import ConfigError, validate
from tfjax.jobs import samples, stages
from tfjax.jobs.runner import Barrier, Job, Stage, check_stages, names, primary, run_stages
from tfjax.paths import Paths

CHAIN = (
    Stage("data", stages.data, where=primary),
    Stage("vae", stages.vae, where=primary),
    Barrier("VAE ready", when=stages.latents_sharded),
    Stage("latents", stages.latents,
          where=lambda job: jax.process_index() == 0 or stages.latents_sharded(job)),
    Barrier("data ready"),
    Stage("train", stages.train),
    Stage("samples", samples.stage, done=samples.current, where=primary),
    Stage("report", stages.report, where=primary),
)
STAGES = names(CHAIN)


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Sequence[str] = STAGES, num_samples: int = 32) -> dict[str, Any]:
  """Runs the requested stages in order; returns {stage: result, "seconds": {...}}.

  num_samples: held-out captions (and images) the samples stage generates from.
  """
  check_stages(stages, CHAIN)
  validate(config)
  if config.chameleon.enabled:  # its stages differ (VQ tokens, no diffusion)
    raise ValueError("config key chameleon.enabled is True: this is a Chameleon baseline config; "
                     "run it with tfjax-chameleon --config=... --workdir=...")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  paths = Paths.from_command_line(config, workdir)
  if config.vae.path and not os.path.exists(paths.vae):
    raise ConfigError(f"config key vae.path: {paths.vae} does not exist")
  job = Job(config=paths.resolved_config(), workdir=workdir, stages=tuple(stages),
            vae_dir=paths.vae, vae_workdir=workdir, num_samples=num_samples,
            sample_during_training=True)
  return run_stages(CHAIN, job)
