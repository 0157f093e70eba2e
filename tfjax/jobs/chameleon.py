"""The Chameleon baseline's job: the main job's chain with VQ tokens for latents.

  data     dataset + tokenizer            tfjax.data.build_all       data.dir
  vq       the VQ-VAE (vae.kind = vq)     tfjax.vae.train.train_vae  WORKDIR/vae or vae.path
  tokens   VQ codes of the images         tokens.build_token_cache   chameleon.tokens
  train    the transformer, LM loss only  tfjax.train.loop.train     WORKDIR/checkpoints
  eval     the evaluation suite           tfjax.eval.suite           WORKDIR/eval

Each stage reuses what exists, so re-running continues where it stopped.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections

from tfjax.chameleon import batches, tokens
from tfjax.config import ConfigError, validate
from tfjax.jobs import stages
from tfjax.jobs.runner import Job, Stage, check_stages, names, primary, run_stages
from tfjax.train.loop import resolve_paths

CHAIN = stages.evaluated_chain("vq", Stage("tokens", stages.vq_tokens, where=primary))
STAGES = names(CHAIN)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises naming the key when a config cannot be a Chameleon run."""
  validate(config)
  if not config.chameleon.enabled:
    raise ConfigError("config key chameleon.enabled must be True for a Chameleon run")
  if config.vae.kind != "vq":
    raise ConfigError(f"config key vae.kind={config.vae.kind!r}: the Chameleon baseline needs "
                      "a VQ-VAE ('vq')")
  batches.check_layout(config)
  tokens.check_vocab(config, int(config.vae.codebook_size))


def with_assets(config: ml_collections.ConfigDict, vq_dir: str,
                token_dir: str | None = None) -> ml_collections.ConfigDict:
  """A copy of config reading the VQ-VAE at vq_dir and the token cache as its latents."""
  config = config.copy_and_resolve_references()
  config.vae.path = vq_dir
  config.chameleon.tokens = token_dir or tokens.token_dir(config)
  config.data.latents = config.chameleon.tokens
  return config


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Sequence[str] = STAGES) -> dict[str, Any]:
  """Runs the requested stages in order; returns {stage: result, "seconds": {...}}."""
  check_stages(stages, CHAIN)
  check_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = resolve_paths(config, workdir)
  vq_dir = config.vae.path or os.path.join(workdir, "vae")
  job = Job(config=with_assets(config, vq_dir), base_config=config, workdir=workdir,
            stages=tuple(stages), vae_dir=vq_dir, vae_workdir=workdir)
  return run_stages(CHAIN, job)
