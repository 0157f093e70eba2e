"""The stages jobs are made of: data -> tokenizer -> VAE -> latents (or VQ tokens)
-> train -> samples / eval -> report. Each takes the `Job` and returns what
the results record; each reuses what exists (the library call it wraps skips
finished work, the train stage resumes).

  data      dataset + tokenizer            tfjax.data.build.build_all   data.dir
  vae       image autoencoder (or VQ-VAE)  tfjax.vae.train.train_vae    job.vae_dir
  latents   VAE latents of the images      tfjax.data.build.build_latents
  tokens    VQ codes of the images         tfjax.chameleon.tokens       chameleon.tokens
  train     the model                      tfjax.train.loop.train       WORKDIR/checkpoints
  eval      the evaluation suite           tfjax.experiments.evaluate   WORKDIR/eval
  report    WORKDIR/report.md              tfjax.train.report
(samples, the main job's sample grids and scores, is in samples.py.)
"""
from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from tfjax import checkpoints
from tfjax.chameleon import batches, tokens
from tfjax.data import build, streams
from tfjax.experiments.evaluate import evaluate, evaluate_variants, make_generator
from tfjax.jobs import samples
from tfjax.jobs.runner import Barrier, Job, Stage, primary
from tfjax.train import loop
from tfjax.train import report as report_lib
from tfjax.train.state import TrainState
from tfjax.vae.train import train_vae


def data(job: Job) -> dict[str, Any]:
  config = job.assets_config
  return build.build_all(config, config.data.dir)


def vae(job: Job) -> str:
  return train_vae(job.assets_config, job.vae_workdir)


def latents(job: Job) -> dict[str, Any]:
  return build.build_latents(job.config, job.config.data.dir, job.vae())


def latents_sharded(job: Job) -> bool:
  """A stream source's latents are encoded by every process (its share of the
  shards; the last one to finish writes the cache's metadata)."""
  return "latents" in job.stages and streams.is_image_stream(job.config.data.image_text_source)


def vq(job: Job) -> Any:
  """The job's VQ-VAE, its codebook checked against the config's vocabulary."""
  model = job.vae()
  tokens.check_vocab(job.config, model.codebook_size)
  return model


def vq_tokens(job: Job) -> dict[str, Any]:
  return tokens.build_token_cache(job.config, vq(job), job.config.data.dir)


def train_model(config: ml_collections.ConfigDict, workdir: str, *,
                codebook_size: int | None = None,
                sample_fn: Callable[[TrainState, int], None] | None = None,
                devices: list[Any] | None = None) -> loop.TrainResult:
  """Trains (or resumes) config's model: Chameleon batches (LM loss over text and
  VQ codes) when chameleon.enabled, else the Transfusion pipeline's."""
  kw: dict[str, Any] = {}
  if config.chameleon.enabled:
    kw["train_data"], kw["eval_data"] = batches.data_factories(config, codebook_size)
  return loop.train(config, workdir, sample_fn=sample_fn, devices=devices, **kw)


def train(job: Job) -> int:
  """The train stage; raises Preempted (after the save) when a signal stopped it."""
  config = job.config
  sample_fn = (samples.make_sample_fn(config, job.workdir, job.vae_dir)
               if job.sample_during_training else None)
  result = train_model(config, job.workdir,
                       codebook_size=vq(job).codebook_size if config.chameleon.enabled else None,
                       sample_fn=sample_fn, devices=job.devices)
  loop.raise_if_preempted(result, job.workdir)
  return result.step


def eval_suite(job: Job) -> dict[str, Any]:
  """The evaluation suite on the newest checkpoint (EMA when kept) ->
  WORKDIR/eval/eval.json; with job.eval["variants"], text-to-image again under
  each (evaluate_variants) -> WORKDIR/eval/variants.json."""
  config = job.config
  params, _ = checkpoints.restore_params(job.workdir, config=config)
  model = vq(job) if config.chameleon.enabled else job.vae()
  tok = samples.tokenizer(config)
  make = lambda cfg: make_generator(cfg, params, tok, model)
  e, out_dir = job.eval, os.path.join(job.workdir, "eval")
  n, seed, batch = int(e["num_samples"]), int(e.get("seed", 0)), int(e.get("batch_size", 16))
  result = evaluate(make(config), out_dir, n, seed=seed, batch_size=batch)
  if e.get("variants"):
    evaluate_variants(config, make, out_dir, dict(e["variants"]), n, seed=seed, batch_size=batch)
  return result


def report(job: Job) -> str:
  return report_lib.write_report(job.config, job.workdir)


def evaluated_chain(vae_name: str, images: Stage) -> tuple[Stage | Barrier, ...]:
  """data -> (VQ-)VAE -> `images` (latents or VQ tokens) -> train -> eval: the
  Chameleon job's chain and every sweep run's. Process 0 builds the assets."""
  return (Stage("data", data, where=primary),
          Stage(vae_name, vae, where=primary),
          images,
          Barrier("data ready"),
          Stage("train", train),
          Stage("eval", eval_suite, where=primary))
