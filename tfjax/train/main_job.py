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
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from tfjax.config import ConfigError, validate

log = logging.getLogger(__name__)

STAGES = ("data", "vae", "latents", "train", "samples", "report")
SAMPLES_FILE = "samples.json"
CPU_SECONDS_FILE = "stage_cpu_seconds.json"


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children.

  Beside wall time, the measure of a stage's cost that other work sharing
  the machine does not inflate (much): wall on a free machine is about this
  divided by the cores the stage keeps busy.
  """
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _latest_step(workdir: str) -> int | None:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  return max(steps) if steps else None


def _samples_current(path: str, workdir: str) -> bool:
  """Samples exist and were made from the newest checkpoint (not an older one)."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("step") == _latest_step(workdir)


def stage_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  from tfjax.data.build import build_all
  return build_all(config, config.data.dir)


def stage_vae(config: ml_collections.ConfigDict, workdir: str) -> str:
  from tfjax.vae.train import train_vae
  return train_vae(config, workdir)


def stage_latents(config: ml_collections.ConfigDict, vae: Any) -> dict[str, Any]:
  """vae: a loaded VAE (`tfjax.vae.load`) or anything with encode/scale/shift."""
  from tfjax.data.build import build_latents
  return build_latents(config, config.data.dir, vae)


def load_params(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True) -> Any:
  """The newest checkpoint's parameters (EMA when kept) on one device, as numpy."""
  from tfjax.model import init_params
  from tfjax.train import mesh as mesh_lib
  from tfjax.train.checkpoint import Checkpointer
  from tfjax.train.optimizer import make_optimizer
  from tfjax.train.state import state_shardings
  one = config.copy_and_resolve_references()
  one.mesh.data, one.mesh.fsdp, one.mesh.tensor = 1, 1, 1
  mesh = mesh_lib.make_mesh(one.mesh, jax.devices()[:1])
  abstract, _ = state_shardings(one, mesh, make_optimizer(one.train), init_params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), one.train)
  found = ckpt.restore(abstract)
  ckpt.close()
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  _, state = found
  params = state.ema if use_ema and config.train.ema_decay > 0 and state.ema else state.params
  return jax.device_get(params)


def _held_out(config: ml_collections.ConfigDict, n: int, split: str = "validation"
              ) -> list[dict[str, Any]]:
  from tfjax.data import sources
  from tfjax.data.latents import decode_image
  src = sources.image_source(config, config.data.dir, split, limit=n)
  out = []
  for i in range(min(n, len(src))):
    rec = src[i]
    cap = rec["caption"]
    scene = rec.get("scene", "")
    out.append({"image": decode_image(rec["image"]),
                "caption": cap.decode() if isinstance(cap, bytes) else str(cap),
                "scene": json.loads(scene) if scene else None})
  return out


def caption_mentions(caption: str, scene: dict[str, Any] | None) -> bool | None:
  """Does a generated caption name every object's colour and shape? (None: no scene)."""
  if not scene:
    return None
  words = caption.lower().replace(",", " ").replace(".", " ").split()
  return all(o["color"] in words and o["shape"] in words for o in scene["objects"])


def stage_samples(config: ml_collections.ConfigDict, workdir: str, vae: Any,
                  num: int = 32) -> dict[str, Any]:
  """Text->image on held-out captions and image->text on held-out images, scored."""
  from tfjax.data import sources
  from tfjax.data.tokenizer import Tokenizer
  from tfjax.generate.mixed import Generator
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  params = load_params(config, workdir)
  tokenizer = Tokenizer.load(sources.tokenizer_path(config, config.data.dir))
  gen = Generator(config, params, tokenizer, vae)
  held = _held_out(config, num)
  rng = jax.random.key(config.train.seed + 7)
  t0 = time.time()
  latents = gen.text_to_image([h["caption"] for h in held], jax.random.fold_in(rng, 0))
  images = gen.decode_latents(latents)
  t_images = time.time() - t0
  t0 = time.time()
  captions = gen.image_to_text([h["image"] for h in held], jax.random.fold_in(rng, 1))
  t_captions = time.time() - t0
  result: dict[str, Any] = {"step": _latest_step(workdir), "num": len(held),
                            "image_seconds": t_images,
                            "caption_seconds": t_captions}
  from PIL import Image
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(out_dir, f"t2i_{i:03d}.png"))
  result["t2i"] = [{"caption": h["caption"], "file": f"samples/t2i_{i:03d}.png"}
                   for i, h in enumerate(held)]
  result["i2t"] = [{"reference": h["caption"], "generated": c,
                    "mentions": caption_mentions(c, h["scene"])} for h, c in zip(held, captions)]
  scenes = [h["scene"] for h in held]
  if all(s is not None for s in scenes):
    from tfjax.eval.shapes_checker import accuracy, score
    result["t2i_scores"] = accuracy(images, scenes)
    for r, im, s in zip(result["t2i"], images, scenes):
      r["verdict"] = score(im, s)
    ok = [r["mentions"] for r in result["i2t"]]
    result["i2t_mentions_accuracy"] = float(np.mean(ok))
  from tfjax.eval.cider import cider_d
  result["i2t_cider_d"] = cider_d(captions, [[h["caption"]] for h in held])[0]
  np.save(os.path.join(out_dir, "t2i_images.npy"), images)
  with open(os.path.join(out_dir, SAMPLES_FILE), "w") as f:
    json.dump(result, f, indent=2, default=float)
  return result


def make_sample_fn(config: ml_collections.ConfigDict, workdir: str, vae_dir: str,
                   num: int = 8) -> Any:
  """A `sample_fn(state, step)` for the loop: images for fixed held-out captions,
  saved as one PNG row per call to DIR/samples/step_NNNNNNN.png (and the
  captions to prompts.txt). None when train.sample_every is 0 or on several
  hosts (the weights would have to be gathered onto one)."""
  if not config.train.sample_every or jax.process_count() > 1:
    return None
  from PIL import Image
  from tfjax.data import sources
  from tfjax.data.tokenizer import Tokenizer
  from tfjax.generate.mixed import Generator
  prompts = [h["caption"] for h in _held_out(config, num)]
  tokenizer = Tokenizer.load(sources.tokenizer_path(config, config.data.dir))
  vae = _load_vae(vae_dir)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")

  def sample(state: Any, step: int) -> None:
    use_ema = config.train.ema_decay > 0 and state.ema
    params = jax.device_get(state.ema if use_ema else state.params)
    gen = Generator(config, params, tokenizer, vae)
    images = gen.decode_latents(gen.text_to_image(prompts, jax.random.key(step)))
    Image.fromarray(np.concatenate(list(images), axis=1)).save(
        os.path.join(out_dir, f"step_{step:07d}.png"))
  return sample


def _load_vae(vae_dir: str) -> Any:
  import tfjax.vae
  return tfjax.vae.load(vae_dir)


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Sequence[str] = STAGES, num_samples: int = 32) -> dict[str, Any]:
  """Runs the requested stages in order; returns {stage: result, "seconds": {...}}.

  num_samples: held-out captions (and images) the samples stage generates from.
  """
  from tfjax.paths import Paths
  from tfjax.train.preemption import StopSignals
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
  validate(config)
  if config.chameleon.enabled:  # its stages differ (VQ tokens, no diffusion)
    raise ValueError("config key chameleon.enabled is True: this is a Chameleon baseline config; "
                     "run it with tfjax-chameleon --config=... --workdir=...")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  paths = Paths.from_command_line(config, workdir)
  if config.vae.path and not os.path.exists(paths.vae):
    raise ConfigError(f"config key vae.path: {paths.vae} does not exist")
  config = paths.resolved_config()
  with StopSignals(defer=False):
    return _run_stages(config, workdir, paths, stages, num_samples)


def _run_stages(config: ml_collections.ConfigDict, workdir: str, paths: Any,
                stages: Sequence[str], num_samples: int) -> dict[str, Any]:
  from tfjax.train.loop import raise_if_preempted, train
  from tfjax.train import report as report_lib
  results: dict[str, Any] = {"seconds": {}, "cpu_seconds": {}}
  timings_path = os.path.join(workdir, "stage_seconds.json")
  cpu_path = os.path.join(workdir, CPU_SECONDS_FILE)
  for key, path in (("seconds", timings_path), ("cpu_seconds", cpu_path)):
    if os.path.exists(path):
      with open(path) as f:
        results[key].update(json.load(f))
  vae_dir = paths.vae
  primary = jax.process_index() == 0

  def timed(name, fn):
    t0, c0 = time.time(), cpu_seconds()
    log.info("=== stage %s ===", name)
    out = fn()
    results[name] = out
    results["seconds"][name] = round(time.time() - t0, 1)
    results["cpu_seconds"][name] = round(cpu_seconds() - c0, 1)
    if primary:
      for key, path in (("seconds", timings_path), ("cpu_seconds", cpu_path)):
        with open(path, "w") as f:
          json.dump(results[key], f, indent=2)
    log.info("=== stage %s done in %.1fs (%.1f CPU s) ===", name, results["seconds"][name],
             results["cpu_seconds"][name])
    return out

  # Dataset and VAE are built once, by process 0; other hosts wait. The
  # latents of a stream source are encoded by every process (its share of
  # the shards; the last one to finish writes the cache's metadata).
  from tfjax.data import streams
  sharded = "latents" in stages and streams.is_image_stream(config.data.image_text_source)
  if primary:
    if "data" in stages:
      timed("data", lambda: stage_data(config))
    if "vae" in stages:
      vae_dir = timed("vae", lambda: stage_vae(config, workdir))
  if sharded and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tfjax main job: VAE ready")
  if "latents" in stages and (primary or sharded):
    timed("latents", lambda: stage_latents(config, _load_vae(vae_dir)))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tfjax main job: data ready")
  if "train" in stages:
    result = timed("train", lambda: train(config, workdir,
                                          sample_fn=make_sample_fn(config, workdir, vae_dir)))
    results["train"] = result.step
    raise_if_preempted(result, workdir)
  samples_path = os.path.join(workdir, "samples", SAMPLES_FILE)
  if primary and "samples" in stages:
    if _samples_current(samples_path, workdir):
      log.info("samples: %s is from the latest checkpoint; reusing it", samples_path)
    else:
      timed("samples", lambda: stage_samples(config, workdir, _load_vae(vae_dir),
                                            num=num_samples))
  if primary and "report" in stages:
    timed("report", lambda: report_lib.write_report(config, workdir))
  return results
