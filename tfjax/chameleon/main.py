"""The Chameleon baseline's stages, mirroring the Transfusion main job.

  data     dataset + tokenizer            tfjax.data.build_all       data.dir
  vq       the VQ-VAE (vae.kind = vq)     tfjax.vae.train.train_vae  WORKDIR/vae or vae.path
  tokens   VQ codes of the images         tokens.build_token_cache   chameleon.tokens
  train    the transformer, LM loss only  tfjax.train.loop.train     WORKDIR/checkpoints
  eval     the evaluation suite           tfjax.eval.suite           WORKDIR/eval

Each stage reuses what exists, so re-running continues where it stopped.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ml_collections

from tfjax.chameleon import batches, tokens
from tfjax.config import ConfigError, validate

log = logging.getLogger(__name__)

STAGES = ("data", "vq", "tokens", "train", "eval")


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


def train_run(config: ml_collections.ConfigDict, workdir: str, codebook_size: int,
              devices: list[Any] | None = None) -> Any:
  """Trains (or resumes) the model on Chameleon batches; returns the TrainResult."""
  from tfjax.train.loop import train
  train_data, eval_data = batches.data_factories(config, codebook_size)
  return train(config, workdir, train_data=train_data, eval_data=eval_data, devices=devices)


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, vq: Any,
                 num_samples: int = 32) -> dict[str, Any]:
  """The evaluation suite on the newest checkpoint -> WORKDIR/eval/eval.json."""
  from tfjax.chameleon.generate import ChameleonGenerator
  from tfjax.data import sources
  from tfjax.data.tokenizer import Tokenizer
  from tfjax.experiments.evaluate import evaluate
  from tfjax.train.main_job import load_params
  params = load_params(config, workdir)
  tok = Tokenizer.load(sources.tokenizer_path(config, config.data.dir))
  gen = ChameleonGenerator(config, params, tok, vq)
  return evaluate(gen, os.path.join(workdir, "eval"), num_samples)


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Sequence[str] = STAGES) -> dict[str, Any]:
  """Runs the requested stages in order; returns {stage: result}."""
  import tfjax.vae
  from tfjax.data.build import build_all
  from tfjax.train.loop import resolve_paths
  from tfjax.vae.train import train_vae
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
  check_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = resolve_paths(config, workdir)
  out: dict[str, Any] = {}
  if "data" in stages:
    out["data"] = build_all(config, config.data.dir)
  vq_dir = config.vae.path or os.path.join(workdir, "vae")
  if "vq" in stages:
    vq_dir = train_vae(config, workdir)
  vq = tfjax.vae.load(vq_dir)
  tokens.check_vocab(config, vq.codebook_size)
  config = with_assets(config, vq_dir)
  if "tokens" in stages:
    out["tokens"] = tokens.build_token_cache(config, vq, config.data.dir)
  if "train" in stages:
    from tfjax.train.loop import raise_if_preempted
    result = train_run(config, workdir, vq.codebook_size)
    out["train"] = result.step
    raise_if_preempted(result, workdir)
  if "eval" in stages:
    out["eval"] = evaluate_run(config, workdir, vq)
  return out
